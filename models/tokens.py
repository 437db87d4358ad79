"""One-time confirmation tokens (R3): issued once, stored only as a hash, compared in constant time.

Resets and campaigns are confirmed the same way, so the token rules live here once.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets


def new_token() -> tuple[str, str]:
    """A one-time confirmation token and the hash that is stored in its place.

    URL-safe base64 can start with ``-``, which a shell command line reads as an
    option (``--token -x...``); such a draw is discarded, so every token is safe
    to paste. Tokens issued before this rule still confirm: only the hash is compared.
    """
    token = secrets.token_urlsafe(24)
    while token.startswith("-"):
        token = secrets.token_urlsafe(24)
    return token, hash_token(token)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(token: str, stored_hash: str | None) -> bool:
    return stored_hash is not None and hmac.compare_digest(hash_token(token), stored_hash)
