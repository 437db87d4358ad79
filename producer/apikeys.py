"""API keys of the services that call the HTTP producer.

A key is shown once, when it is created, and stored only as its SHA-256. It
looks like ``prk_3f9a1c0b.<secret>``: the part before the dot is the key's
*prefix*, stored in clear and unique, so a presented key is found with one
indexed lookup and then compared in constant time. The prefix is what logs,
the audit trail and ``api-key revoke`` name; the secret never leaves the
caller.

Each key is scoped to one organization: the acting admin a caller names must
belong to it, and every object the caller reaches is looked up inside it.
Functions take a ``Session`` and never commit.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session

from models.audit import record_audit
from models.errors import NotFound, Unauthenticated, ValidationFailed
from models.schema import ApiKey, Organization, User
from models.text import check_storable
from models.times import as_utc, utcnow

KEY_PREFIX = "prk_"
# The name becomes the audit origin ``http:<name>`` (origin is 64 characters).
MAX_ORIGIN_NAME = 59
MAX_PRESENTED_KEY = 200


@dataclass(frozen=True)
class CreatedKey:
    """A new key: ``key`` is the only copy of the secret there will ever be."""

    id: int
    organization_id: int
    name: str
    prefix: str
    key: str
    created_at: datetime

    def as_json(self) -> dict:
        return {"id": self.id, "organization_id": self.organization_id, "name": self.name, "prefix": self.prefix,
                "key": self.key, "created_at": self.created_at.isoformat()}


@dataclass(frozen=True)
class ApiIdentity:
    """Who is calling: the key's id, organization, name and prefix (never the secret)."""

    key_id: int
    organization_id: int
    name: str
    prefix: str

    @property
    def origin(self) -> str:
        """How requests made with this key are recorded in the audit trail."""
        return f"http:{self.name}"

    def require_actor(self, session: Session, actor_id: int) -> User:
        """The acting admin, who must belong to the key's organization; anyone else does not exist (R2)."""
        actor = session.get(User, actor_id)
        if actor is None or actor.organization_id != self.organization_id:
            raise NotFound(f"actor {actor_id} not found")
        return actor


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _new_prefix() -> str:
    return KEY_PREFIX + secrets.token_hex(4)


def create_api_key(session: Session, organization_id: int, name: str, origin: str = "cli") -> CreatedKey:
    """Create a key for ``organization_id`` named ``name`` (the calling service); returns the secret once."""
    name = check_storable("name", (name or "").strip())
    if not name:
        raise ValidationFailed("an API key needs a name (the service that will use it)")
    if len(name) > MAX_ORIGIN_NAME or not name.isprintable():
        raise ValidationFailed(f"API key names are 1 to {MAX_ORIGIN_NAME} printable characters")
    if session.get(Organization, organization_id) is None:
        raise NotFound(f"organization {organization_id} not found")
    now = utcnow()
    for _ in range(5):
        prefix = _new_prefix()
        # 32 bits of prefix: a collision is rare and simply draws again.
        if session.scalar(select(ApiKey.id).where(ApiKey.prefix == prefix)) is None:
            break
    else:  # pragma: no cover - five collisions in a row
        raise RuntimeError("could not draw an unused API key prefix")
    key = f"{prefix}.{secrets.token_urlsafe(32)}"
    row = ApiKey(organization_id=organization_id, name=name, prefix=prefix, key_hash=hash_key(key), created_at=now)
    session.add(row)
    session.flush()
    record_audit(session, "api_key.created", organization_id, origin=origin, details={"prefix": prefix, "name": name})
    return CreatedKey(row.id, organization_id, name, prefix, key, now)


def verify_api_key(session: Session, presented: str | None) -> ApiIdentity:
    """The identity behind a presented key; ``Unauthenticated`` when missing, unknown, wrong or revoked.

    The reasons are not told apart to the caller, so a key cannot be probed.
    """
    if not presented:
        raise Unauthenticated("an API key is required: send 'Authorization: Bearer <key>' or 'X-API-Key: <key>'")
    presented = presented.strip()
    prefix, dot, _secret = presented.partition(".")
    if not dot or not prefix.startswith(KEY_PREFIX) or len(presented) > MAX_PRESENTED_KEY:
        raise Unauthenticated("the API key is not valid")
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix)).first()
    if row is None or not hmac.compare_digest(row.key_hash, hash_key(presented)) or row.revoked_at is not None:
        raise Unauthenticated("the API key is not valid or has been revoked")
    return ApiIdentity(row.id, row.organization_id, row.name, row.prefix)


def revoke_api_key(session: Session, prefix: str, origin: str = "cli") -> dict:
    """Revoke the key with ``prefix``; requests with it are refused from the next one on. Safe to run twice."""
    check_storable("prefix", prefix)
    row = session.scalars(select(ApiKey).where(ApiKey.prefix == prefix.strip()).with_for_update()).first()
    if row is None:
        raise NotFound(f"API key {prefix} not found")
    if row.revoked_at is None:
        row.revoked_at = utcnow()
        record_audit(session, "api_key.revoked", row.organization_id, origin=origin,
                     details={"prefix": row.prefix, "name": row.name})
    return describe_key(row)


def list_api_keys(session: Session, organization_id: int | None = None) -> list[dict]:
    """Every key (or one organization's), oldest first, without secrets or hashes."""
    query = select(ApiKey).order_by(ApiKey.id)
    if organization_id is not None:
        query = query.where(ApiKey.organization_id == organization_id)
    return [describe_key(row) for row in session.scalars(query)]


def describe_key(row: ApiKey) -> dict:
    return {"id": row.id, "organization_id": row.organization_id, "name": row.name, "prefix": row.prefix,
            "created_at": as_utc(row.created_at).isoformat(),
            "revoked_at": as_utc(row.revoked_at).isoformat() if row.revoked_at else None}
