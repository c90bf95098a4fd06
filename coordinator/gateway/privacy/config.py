"""`[gateway.privacy]`: what counts as sensitive, where sensitive requests may go, and what to do
when no eligible node serves the model. Per tenant, the governance policy may override the
classes (`privacy_classes`), the action (`privacy_action`) and mark every request sensitive
(`privacy_always`). Errors name the field as `gateway.privacy.<field>`."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

DETECTORS = ("email", "phone", "credit_card", "iban", "national_id", "ip_address", "secret")
ACTIONS = ("refuse", "mask")
_CLASS = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True, slots=True)
class PrivacyConfig:
    enabled: bool = False
    detectors: tuple[str, ...] = DETECTORS
    patterns: dict[str, str] = field(default_factory=dict)  # operator regexes: name -> regex
    phone_regions: tuple[str, ...] = ("US",)  # regions of numbers written without +CC
    sensitive_classes: tuple[str, ...] = ("restricted",)  # node classes a sensitive one may use
    action: str = "refuse"  # refuse | mask: a sensitive request no eligible node serves

    def __post_init__(self) -> None:
        for d in self.detectors:
            if d not in DETECTORS:
                raise ValueError(f"gateway.privacy.detectors: {d!r} is not one of "
                                 f"{', '.join(DETECTORS)}")
        for name, pattern in self.patterns.items():
            if not re.fullmatch(r"[a-z0-9_]{1,32}", name) or name in DETECTORS:
                raise ValueError(f"gateway.privacy.patterns.{name}: names are 1-32 of a-z 0-9 _ "
                                 "and not a built-in detector's")
            try:
                re.compile(pattern)
            except re.error as e:
                raise ValueError(f"gateway.privacy.patterns.{name}: bad regex: {e}") from None
        check_classes(self.sensitive_classes, "gateway.privacy.sensitive_classes")
        if not self.sensitive_classes:
            raise ValueError("gateway.privacy.sensitive_classes: name at least one class")
        if self.action not in ACTIONS:
            raise ValueError(f"gateway.privacy.action: must be refuse or mask, got "
                             f"{self.action!r}")
        for r in self.phone_regions:
            if not re.fullmatch(r"[A-Z]{2}", r):
                raise ValueError(f"gateway.privacy.phone_regions: {r!r} is not a two-letter "
                                 "region code")


def check_classes(classes: tuple[str, ...], where: str) -> None:
    for c in classes:
        if not _CLASS.fullmatch(c):
            raise ValueError(f"{where}: {c!r}: a class is 1-32 of a-z 0-9 _ -")
