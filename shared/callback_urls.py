"""Callback URLs: what the farm accepts as a webhook's destination, and where it may connect.

A callback URL is parsed with the standard library's URL parser (never a regular expression): it
must be `http` or `https`, name a host, and carry no user-info (`user:password@`), which would
only end up in logs. `parse_callback_url` says what is wrong in words; the API turns that into a
422 at submit, and the webhook sender marks a stored delivery whose URL fails it as failed.

Where the farm may connect is a question about addresses, not names: `refusal` says why an
address is off limits (loopback, link-local, private, multicast, cloud metadata, or otherwise not
public) unless the operator allows a network that holds it (`SDFARM_WEBHOOK_ALLOW_NETWORKS`). The
sender resolves the host itself, checks every address, and connects to the address it checked,
so a name that resolves elsewhere a moment later (DNS rebinding) gains nothing.

`redact` is the only form of a callback URL that goes into a log line or an error message:
scheme, host, port and path, never the user-info or the query (they are where tokens live).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

__all__ = [
    "CallbackTarget",
    "IPAddress",
    "IPNetwork",
    "host_address",
    "parse_callback_url",
    "parse_networks",
    "redact",
    "refusal",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

_DEFAULT_PORTS = {"http": 80, "https": 443}
_HOST_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789-_.")
_ASCII_SHOWN = "".join(chr(code) for code in range(33, 127))  # kept as is in a request target
_REDACTED_CHARS = 200  # a redacted URL in a log line is cut to this
# Cloud metadata services that are not already link-local (169.254.169.254 is): Alibaba's, and
# AWS's IPv6 one. Named so that the refusal says what the address is.
_METADATA = frozenset(
    {ipaddress.ip_address("100.100.100.200"), ipaddress.ip_address("fd00:ec2::254")}
)

# What makes an address off limits, checked in this order; the first that applies names it.
_REFUSED: tuple[tuple[str, Callable[[IPAddress], bool]], ...] = (
    ("cloud metadata", lambda address: address in _METADATA),
    ("loopback", lambda address: address.is_loopback),
    ("link-local", lambda address: address.is_link_local),  # 169.254.169.254, metadata, is one
    ("multicast", lambda address: address.is_multicast),
    ("private", lambda address: address.is_private),
    # unspecified, reserved, shared (100.64.0.0/10), documentation, benchmarking ...
    ("non-public", lambda address: not address.is_global),
)


@dataclass(frozen=True)
class CallbackTarget:
    """A parsed callback URL: what to connect to and what to ask for there."""

    scheme: str  # "http" or "https"
    host: str  # lower case; an IPv6 literal without its brackets
    port: int  # as written, else the scheme's default
    target: str  # the request target: path (at least "/") and query, in ASCII

    @property
    def host_header(self) -> str:
        """The `Host` header's value: the host, with the port where it is not the default."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == _DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_callback_url(url: str) -> CallbackTarget:
    """The target of a callback URL; ValueError saying what to fix when it is not one."""
    if any(ch.isspace() or not ch.isprintable() for ch in url):
        raise ValueError("a callback URL may not hold spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as e:  # a port that is not a number, a bracketed host that is no IPv6
        raise ValueError(f"a callback URL must be scheme://host[:port]/path ({e})") from e
    if parts.scheme not in _DEFAULT_PORTS:
        raise ValueError(f"a callback URL must start with http:// or https://, got {redact(url)}")
    if "@" in parts.netloc:
        raise ValueError("a callback URL may not hold user-info (`user:password@`)")
    host = parts.hostname or ""
    if not host:
        raise ValueError("a callback URL must name a host, as in https://hooks.example/sdfarm")
    if host_address(host) is None and not _is_dns_name(host):
        raise ValueError(
            f"the callback URL's host {host[:60]!r} is not a DNS name or an IP address "
            "(write an internationalised name in its xn-- form)"
        )
    if port == 0:
        raise ValueError("a callback URL's port must be between 1 and 65535")
    target = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    target = quote(target, safe=_ASCII_SHOWN)  # a non-ASCII path is sent percent-encoded
    return CallbackTarget(parts.scheme, host, port or _DEFAULT_PORTS[parts.scheme], target)


def host_address(host: str) -> IPAddress | None:
    """The address a host names when it is an IP literal (IPv4-mapped IPv6 as IPv4), else None."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def refusal(address: IPAddress, allow: Sequence[IPNetwork]) -> str | None:
    """Why the farm may not connect to `address`, as an adjective ("loopback"); None: it may."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if any(address in network for network in allow):
        return None
    return next((kind for kind, applies in _REFUSED if applies(address)), None)


def parse_networks(text: str) -> list[IPNetwork]:
    """`127.0.0.0/8,10.1.0.0/16,...` as networks; ValueError naming the entry that is not one."""
    networks: list[IPNetwork] = []
    for entry in (part.strip() for part in text.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry))
        except ValueError as e:
            raise ValueError(
                f"network {entry!r} must be an address or CIDR block such as 127.0.0.0/8 ({e})"
            ) from e
    return networks


def redact(url: str) -> str:
    """`url` as scheme://host[:port]/path, for logs: no user-info, no query, no fragment."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        host = f"[{host}]" if ":" in host else host
        try:
            port = f":{parts.port}" if parts.port else ""
        except ValueError:
            port = ":?"
        shown = f"{parts.scheme or '?'}://{host}{port}{parts.path}"
    except ValueError:
        return "<an unparseable URL>"
    shown = "".join(ch if ch.isprintable() and not ch.isspace() else "?" for ch in shown)
    return shown[:_REDACTED_CHARS]


def _is_dns_name(host: str) -> bool:
    labels = host.removesuffix(".").split(".")
    return (
        len(host) <= 253
        and set(host) <= _HOST_CHARS
        and all(0 < len(label) <= 63 and not label.startswith("-") for label in labels)
    )
