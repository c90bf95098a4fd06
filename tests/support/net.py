"""Ports for test servers.

The kernel hands out ports for outgoing connections from its ephemeral range
(`net.ipv4.ip_local_port_range`, 32768-60999 here), so a port found free there with
`bind(0)` may be taken by a client socket before the test's server binds it. Test ports
come from below that range instead, each handed out once per test session.
"""

from __future__ import annotations

import os
import random
import socket

LOW, HIGH = 20000, 32000  # below the ephemeral range; not Ray's worker ports (10002-19999)
_given: set[int] = set()
_rng = random.Random(int.from_bytes(os.urandom(8), "big"))


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_port_block(n: int) -> int:
    """The first of `n` consecutive ports, all free now and not handed out before."""
    for _ in range(10000):
        first = _rng.randrange(LOW, HIGH - n)
        block = range(first, first + n)
        if not _given.intersection(block) and all(_bindable(p) for p in block):
            _given.update(block)
            return first
    raise RuntimeError(f"no {n} free consecutive ports in {LOW}..{HIGH}")


def free_port() -> int:
    return free_port_block(1)
