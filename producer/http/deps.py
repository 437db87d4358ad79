"""What a route needs from the request: the caller's API key, the acting user, a JSON body, a page.

The key itself is checked by the middleware before the body is read (so an
unauthenticated caller cannot make the server parse a large body); the route
dependency only hands over the identity it established, and declares the two
ways to present a key, so the OpenAPI document lists them as security schemes.
The acting user a request names is checked in the same transaction as the
change it asks for, so the rule that it belongs to the key's organization is
applied in one place.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Annotated, Any

from fastapi import Depends, Query, Request, Security
from fastapi.security import APIKeyHeader, HTTPBearer
from sqlalchemy.orm import Session

from models.db import session_scope
from models.errors import Unauthenticated, UnsupportedMediaType
from producer.apikeys import ApiIdentity, verify_api_key
from producer.pages import MAX_FILTER_VALUES, MAX_LIMIT

# --- the API key ---------------------------------------------------------------------------------

_bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer <key>`.")
_api_key_header = APIKeyHeader(name="X-API-Key", auto_error=False, description="An API key (alternative header).")


def presented_key(headers) -> str | None:
    authorization = headers.get("authorization")
    if authorization:
        scheme, _, credentials = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            return ""  # present but not a bearer key: refused, never ignored
        return credentials.strip()
    return headers.get("x-api-key")


def authenticate(presented: str | None) -> ApiIdentity:
    with session_scope() as session:
        return verify_api_key(session, presented)


def current_identity(request: Request, _bearer_key=Security(_bearer), _header_key=Security(_api_key_header)
                     ) -> ApiIdentity:
    """The caller's identity, established by the middleware before the body was read."""
    identity = getattr(request.state, "identity", None)
    if identity is None:  # pragma: no cover - the middleware guards every /v1/ path
        raise Unauthenticated("an API key is required")
    return identity


Caller = Annotated[ApiIdentity, Depends(current_identity)]


@contextmanager
def session_as(caller: ApiIdentity, actor_id: int) -> Iterator[Session]:
    """One transaction in which ``actor_id`` acts: a user of the key's organization, or 404 before anything."""
    with session_scope() as session:
        caller.require_actor(session, actor_id)
        yield session


# --- request bodies are JSON -------------------------------------------------------------------------

def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (media.startswith("application/") and media.endswith("+json"))


def require_json_body(request: Request) -> None:
    """A body sent as anything but JSON (``text/plain``, a form) is refused with 415, not parsed as JSON."""
    content_type = request.headers.get("content-type")
    if content_type is not None and not _is_json(content_type):
        media = content_type.split(";", 1)[0].strip() or "(empty)"
        raise UnsupportedMediaType(f"the request body must be application/json, not {media}")


JsonBody = Depends(require_json_body)


# --- pages of a listing ------------------------------------------------------------------------------

PageLimit = Annotated[int, Query(ge=1, le=MAX_LIMIT)]
PageCursor = Annotated[str | None, Query(max_length=400, description="`next_cursor` of the previous page")]


def several(item: Any, description: str) -> Any:
    """A list filter of a listing: the parameter repeated matches any of its values (``state=queued&state=running``).

    ``item`` constrains each value; at most ``MAX_FILTER_VALUES`` values. Every
    other query parameter takes one value (:mod:`producer.http.query`).
    """
    return Annotated[list[item] | None, Query(max_length=MAX_FILTER_VALUES, description=(
        f"{description} Repeat the parameter for several values (at most {MAX_FILTER_VALUES}): any of them "
        "matches.").strip())]
