"""Host allow-lists (ORCH_FETCH_ALLOWED_HOSTS): parsing entries and matching a host against them.

Hand-written because no library here does exactly this: names are compared as written, never resolved,
so any other spelling of an address (``127.1``, ``2130706433``) matches nothing and the check fails closed.
"""

from __future__ import annotations

import ipaddress
import re

from .errors import ConfigurationError

#: (host, port): port None allows every port of the host.
Hosts = tuple[tuple[str, int | None], ...]

#: What ORCH_FETCH_ALLOWED_HOSTS means when unset or empty: loopback only, which is what the demo's local
#: API needs. (host, port): port None allows every port of the host.
DEFAULT_FETCH_ALLOWED_HOSTS: Hosts = (
    ("localhost", None),
    ("127.0.0.1", None),
    ("::1", None),
)

_HOST_NAME = re.compile(r"(?:\*\.)?[a-z0-9_](?:[a-z0-9_.-]*[a-z0-9_])?")


def normalize_host(host: str) -> str:
    """The one spelling hosts are compared in: lower case, no trailing dot, IP addresses compressed.
    Anything else (e.g. ``127.1``) stays as written, so it matches no IP entry: the check fails closed."""
    host = host.strip().lower().removesuffix(".")
    try:
        return ipaddress.ip_address(host).compressed
    except ValueError:
        return host


def _host_entry(key: str, raw: str) -> tuple[str, int | None]:
    """One ``host``, ``host:port``, ``[IPv6]:port``, bare IPv6, ``*.domain`` or ``*`` entry."""
    host, port, ipv6 = raw, None, False
    if raw.startswith("["):
        host, sep, rest = raw[1:].partition("]")
        if not sep or (rest and not rest.startswith(":")):
            raise ConfigurationError(f"{key}: bad entry {raw!r} (expected [IPv6] or [IPv6]:port)")
        port, ipv6 = (rest[1:] if rest else None), True
    elif raw.count(":") == 1:
        host, port = raw.split(":")
    elif raw.count(":") > 1:  # a bare IPv6 address: it takes no port (write [IPv6]:port for one)
        ipv6 = True
    number: int | None = None
    if port is not None:
        if not (port.isascii() and port.isdigit()) or not 1 <= int(port) <= 65535:
            raise ConfigurationError(f"{key}: bad port in {raw!r}")
        number = int(port)
    if host == "*":
        if number is not None:
            raise ConfigurationError(f"{key}: '*' allows every host and takes no port, got {raw!r}")
        return host, None
    name = normalize_host(host)
    if ipv6:
        try:
            return ipaddress.IPv6Address(name).compressed, number
        except ValueError:
            raise ConfigurationError(f"{key}: bad IPv6 address in {raw!r}") from None
    try:
        return ipaddress.IPv4Address(name).compressed, number
    except ValueError:
        pass
    # A numeric last label is no DNS name but an IP in another spelling (127.1), which would dodge the list.
    if not _HOST_NAME.fullmatch(name) or ".." in name or name.rsplit(".", 1)[-1].isdigit():
        raise ConfigurationError(
            f"{key}: bad host {raw!r} (a name, an IP address, or '*.' then a domain; no other wildcards)"
        )
    return name, number


def parse_hosts(key: str, raw: str, default: Hosts = DEFAULT_FETCH_ALLOWED_HOSTS) -> Hosts:
    """A comma-separated list of allowed hosts (setting `key`): a value replaces the default (so
    production can drop loopback), and an entry that could be read two ways is refused, not guessed."""
    entries = [e.strip() for e in raw.split(",") if e.strip()]
    if not entries:
        return default
    return tuple(dict.fromkeys(_host_entry(key, e) for e in entries))


def host_allowed(host: str, port: int, allowed: Hosts) -> bool:
    """Exact names and IPs, or a ``*.domain`` entry for any name under that domain (never an IP). Names
    are compared as written, not resolved: anything spelled differently from an entry is refused."""
    name = normalize_host(host)
    try:
        ipaddress.ip_address(name)
        is_ip = True
    except ValueError:
        is_ip = False
    for entry, entry_port in allowed:
        if entry_port is not None and entry_port != port:
            continue
        if entry in ("*", name):
            return True
        if entry.startswith("*.") and not is_ip and name.endswith(entry[1:]) and len(name) > len(entry) - 1:
            return True
    return False
