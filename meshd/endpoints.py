"""Endpoint URLs in capability reports: `scheme://host:port`, parsed and checked once, at the
edge that receives them (the control plane), so nothing downstream stops on a malformed one.

A host is an IPv4 address, a bracketed IPv6 address or a DNS name; a port is 1-65535; no
user, path, query or fragment (a trailing "/" is allowed).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

_NAME = re.compile(r"(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*")
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]{0,15}")


@dataclass(frozen=True, slots=True)
class Endpoint:
    scheme: str
    host: str  # as written, IPv6 without brackets
    port: int

    @property
    def address(self) -> tuple[str, int]:
        """(host, port) with the host normalized (an IP's canonical form, a name lowercased):
        what identifies the listener."""
        return normal_host(self.host), self.port


def parse(url: str, schemes: tuple[str, ...] | None = None) -> Endpoint:
    """Parse `scheme://host:port`; ValueError saying what is wrong. `schemes`: the allowed
    ones (None: any)."""
    scheme, sep, rest = url.partition("://")
    if not sep or not _SCHEME.fullmatch(scheme):
        raise ValueError(f"{url!r} is not scheme://host:port")
    if schemes is not None and scheme not in schemes:
        raise ValueError(f"{url!r}: the scheme must be {' or '.join(schemes)}")
    rest = rest.removesuffix("/")
    if any(c in rest for c in "/?#@ "):
        raise ValueError(f"{url!r}: only scheme://host:port (no path, query or user part)")
    if rest.startswith("["):
        host, sep, port = rest[1:].partition("]:")
        if not sep:
            raise ValueError(f"{url!r}: an IPv6 host needs [addr]:port")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{url!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port = rest.rpartition(":")
        if not sep or not host:
            raise ValueError(f"{url!r} has no host:port")
        if not _is_ipv4(host) and not _NAME.fullmatch(host):
            raise ValueError(f"{url!r}: {host!r} is not an IPv4 address or a host name")
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{url!r}: the port must be 1-65535")
    return Endpoint(scheme, host, int(port))


def normal_host(host: str) -> str:
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower().rstrip(".")


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 host in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == "localhost"


def _is_ipv4(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True
