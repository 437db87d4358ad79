"""Which receiver URLs the system will call: the form of the URL and the addresses behind it.

Checked by both sides, so it lives here, the layer both may use: the producer when an endpoint
is registered, and the delivery task before each attempt (a name may resolve elsewhere later).
An endpoint must never make the workers reach into the internal network.
"""

from __future__ import annotations

import ipaddress
import socket
from urllib.parse import urlsplit

from models.errors import ValidationFailed

MAX_URL = 2000


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError, OSError):
        raise ValidationFailed(f"webhook URL host {host[:100]!r} does not resolve") from None
    return [ipaddress.ip_address(info[4][0].split("%", 1)[0]) for info in infos]


def check_url(url: str, allow_http_loopback: bool) -> str:
    """The receiver URL, or ``ValidationFailed`` saying why not.

    https only; plain http only to a loopback address and only when
    ``WEBHOOKS_ALLOW_HTTP_LOOPBACK`` is on (development, tests). Addresses that
    are not public (private, loopback, link-local such as the cloud metadata
    service, reserved, multicast) are refused unless that setting is on.
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
        raise ValidationFailed("webhook URL must not carry credentials; verify the X-Signature header instead")
    if parts.fragment:
        raise ValidationFailed("webhook URL must not have a #fragment")
    addresses = _addresses(parts.hostname, port or (443 if scheme == "https" else 80))
    if scheme == "http" and not (allow_http_loopback and all(a.is_loopback for a in addresses)):
        raise ValidationFailed("webhook URL must use https (plain http is accepted only to a loopback address "
                               "with WEBHOOKS_ALLOW_HTTP_LOOPBACK=true)")
    if not allow_http_loopback:
        for address in addresses:
            if not address.is_global or address.is_multicast:
                raise ValidationFailed(f"webhook URL resolves to {address}, which is not a public address; "
                                       "private, loopback and link-local receivers are refused")
    return url
