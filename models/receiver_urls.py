"""Which receiver URLs the system will call: the form of the URL and the addresses behind it.

Checked by both sides, so it lives here, the layer both may use: the producer when an endpoint
is registered, and the delivery task before each attempt (a name may resolve elsewhere later).
An endpoint must never make the workers reach into the internal network, so every address the
name resolves to must be public, including IPv4 addresses carried inside IPv6 ones (IPv4-mapped,
IPv4-compatible, NAT64, 6to4, Teredo). The addresses that passed are returned, and the delivery
connects to exactly those (:mod:`tasks.outbound.http`), never resolving the name a second time.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from models.errors import ValidationFailed

MAX_URL = 2000
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# IPv6 prefixes that carry an IPv4 address in their last 32 bits (NAT64: RFC 6052 and RFC 8215).
_NAT64 = (ipaddress.ip_network("64:ff9b::/96"), ipaddress.ip_network("64:ff9b:1::/48"))


@dataclass(frozen=True)
class CheckedUrl:
    """A receiver URL that passed, the host as it is connected to, and the addresses it may use."""

    url: str
    host: str
    addresses: tuple[str, ...]

    def pins(self) -> dict[str, list[str]]:
        """Host -> addresses, for :func:`tasks.outbound.http.post`."""
        return {self.host: list(self.addresses)}


def _embedded_ipv4(address: Address) -> list[ipaddress.IPv4Address]:
    """The IPv4 addresses an IPv6 address carries (or stands for), if any."""
    if isinstance(address, ipaddress.IPv4Address):
        return []
    found = [address.ipv4_mapped, address.sixtofour, *(address.teredo or ())]
    value = int(address)
    if any(address in network for network in _NAT64) or (value >> 32 == 0 and value > 1):
        found.append(ipaddress.IPv4Address(value & 0xFFFFFFFF))  # NAT64, or IPv4-compatible (::a.b.c.d)
    return [a for a in found if a is not None]


def refused_because(address: Address) -> str | None:
    """Why a receiver at ``address`` is refused (not a public unicast address), or None.

    A NAT64 address stands for the IPv4 address it carries (an IPv6-only network reaches
    IPv4-only hosts that way), so only that address is judged.
    """
    nat64 = isinstance(address, ipaddress.IPv6Address) and any(address in network for network in _NAT64)
    candidates = _embedded_ipv4(address) if nat64 else [address, *_embedded_ipv4(address)]
    for candidate in candidates:
        if not candidate.is_global or candidate.is_multicast or candidate.is_reserved or candidate.is_unspecified:
            inside = "" if candidate is address else f" (standing for {candidate})"
            return f"{address}{inside}, which is not a public address"
    return None


def _addresses(host: str, port: int) -> list[Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise ValidationFailed(f"webhook URL host {host[:100]!r} does not resolve") from None
    return list(dict.fromkeys(ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos))


def check_url(url: str, allow_http_loopback: bool) -> CheckedUrl:
    """The receiver URL with the addresses it may be reached at, or ``ValidationFailed`` saying why not.

    https only; plain http only to a loopback address and only when
    ``WEBHOOKS_ALLOW_HTTP_LOOPBACK`` is on (development, tests), which also lets private,
    loopback and link-local receivers through. Otherwise every address the host resolves to must
    be public (:func:`refused_because`).
    """
    if not isinstance(url, str) or not url or len(url) > MAX_URL or not url.isprintable() or " " in url:
        raise ValidationFailed(f"webhook URL must be an https:// URL of at most {MAX_URL} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValidationFailed("webhook URL is malformed (bad host or port)") from None
    scheme = parts.scheme.lower()
    if scheme not in ("https", "http") or not parts.hostname:
        raise ValidationFailed("webhook URL must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise ValidationFailed("webhook URL must not carry credentials; verify the signature headers instead")
    if parts.fragment:
        raise ValidationFailed("webhook URL must not have a #fragment")
    addresses = _addresses(parts.hostname, port or (443 if scheme == "https" else 80))
    if scheme == "http" and not (allow_http_loopback and all(a.is_loopback for a in addresses)):
        raise ValidationFailed("webhook URL must use https (plain http is accepted only to a loopback address "
                               "with WEBHOOKS_ALLOW_HTTP_LOOPBACK=true)")
    if not allow_http_loopback:
        for address in addresses:
            reason = refused_because(address)
            if reason is not None:
                raise ValidationFailed(f"webhook URL resolves to {reason}; private, loopback, link-local and "
                                       "reserved receivers are refused")
    try:
        host = parts.hostname.encode("idna").decode("ascii")
    except UnicodeError:
        raise ValidationFailed("webhook URL host is not a valid domain name") from None
    return CheckedUrl(url, host, tuple(str(a) for a in addresses))
