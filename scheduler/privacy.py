"""A node's privacy class, as routing sees it: its signed `privacy` attribute.

The class comes from the node's capability report (`[agent] attributes privacy = "..."`), which
the registry accepts only as the operator pinned it for the node's key (`meshd trust add KEY
--attr privacy=CLASS`; `coordinator/claims.py`). A node without one is `public`. Pure.
"""

from __future__ import annotations

from collections.abc import Mapping

ATTRIBUTE = "privacy"
DEFAULT_CLASS = "public"


def node_class(attributes: Mapping[str, str]) -> str:
    return attributes.get(ATTRIBUTE) or DEFAULT_CLASS
