"""Idempotency keys of reset requests: the same key and body get the same answer, token included.

The rules follow the IETF draft "The Idempotency-Key HTTP Header Field": a
request repeated with the same key and the same body is answered as the first
one was (marked as a replay) and changes nothing; the same key with another
body is refused (422); a request still in progress with the key is refused
(409) rather than run twice. Keys belong to the acting user.

The first answer holds the one-time confirmation token, which is stored only as
a hash, and a client that lost that answer is the very reason to retry. So the
request also keeps the token *sealed* under the raw key (XOR with
HMAC-SHA256(raw key, "token seal" + request id)), and the raw key itself is
never stored: only HMAC-SHA256(raw key, "lookup") finds the request again. A
reader of the database has neither the key nor the token; only a caller that
holds the key can open the seal (docs/decisions/0010-idempotent-replay.md).
"""

from __future__ import annotations

import hashlib
import hmac
import uuid

from sqlalchemy.orm import Session

from models.dialect import LockSpace, try_transaction_lock
from models.errors import Conflict

# Two messages, so the stored digest never is the seal's key: for a key longer
# than a hash block HMAC would otherwise key both with the same SHA-256 of it.
LOOKUP = b"progress-reset idempotency-key lookup"
SEAL = b"progress-reset token seal "
SEALABLE_BYTES = hashlib.sha256().digest_size


def key_digest(key: str) -> str:
    """What is stored of an idempotency key (hex), to find its request again."""
    return hmac.new(key.encode(), LOOKUP, hashlib.sha256).hexdigest()


def _pad(key: str, request_id: uuid.UUID) -> bytes:
    return hmac.new(key.encode(), SEAL + request_id.bytes, hashlib.sha256).digest()


def seal_token(token: str, key: str, request_id: uuid.UUID) -> str:
    """The token, sealed under the raw key for this request (hex); tokens are 32 ASCII characters."""
    raw = token.encode()
    if len(raw) > SEALABLE_BYTES:
        raise ValueError(f"a sealed token has at most {SEALABLE_BYTES} bytes")
    return bytes(a ^ b for a, b in zip(raw, _pad(key, request_id))).hex()


def unseal_token(sealed: str | None, key: str, request_id: uuid.UUID) -> str | None:
    """The token :func:`seal_token` sealed, or None (nothing sealed). The caller checks it against the hash."""
    if not sealed:
        return None
    try:
        return bytes(a ^ b for a, b in zip(bytes.fromhex(sealed), _pad(key, request_id))).decode("ascii")
    except (ValueError, UnicodeDecodeError):
        return None


def hold_key(session: Session, actor_id: int, digest: str) -> None:
    """Hold the key for this transaction; a request still in progress with it is refused (409).

    PostgreSQL: a transaction-level advisory lock on the actor and the key,
    taken without waiting. SQLite serialises writers, so a second request
    waits for the first and then replays it.
    """
    lock = int.from_bytes(hashlib.sha256(f"{actor_id}:{digest}".encode()).digest()[:4], "big", signed=True)
    if not try_transaction_lock(session, LockSpace.IDEMPOTENCY_KEYS, lock):
        raise Conflict("a request with this idempotency key is still in progress; retry it in a moment "
                       "to get its answer")
