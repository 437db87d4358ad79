"""The HTTP producer: the reset and campaign service functions over HTTP, for other services.

``progress-reset serve`` runs :func:`create_app` on uvicorn. Every endpoint is
a thin call into :mod:`producer.resets` or :mod:`producer.campaigns` (the same
functions the CLI calls, so the rules exist once) inside one
:func:`models.db.session_scope` per request: the transaction commits when the
service function returns, and the service's tasks are published after that
commit.

Authentication: every ``/v1/`` request carries an API key
(``Authorization: Bearer <key>`` or ``X-API-Key: <key>``, see
:mod:`producer.apikeys`), checked before the body is read. A key belongs to
one organization: the ``actor_id`` a caller names must be a user of it, and
every lookup is limited to it, so another organization's courses, jobs and
campaigns answer 404 exactly like ids that do not exist.

Errors are RFC 7807 problem details (``application/problem+json``) with a
stable ``code``; see ``docs/operations.md`` for the table.

The package is split by concern so that each part can be read and changed on
its own:

- :mod:`.app`: :func:`create_app`, which puts the parts below together;
- :mod:`.schemas`: the request and response bodies;
- :mod:`.problems`: every error as a problem document, and the exception handlers;
- :mod:`.deps`: the API key and the JSON-only body, as route dependencies;
- :mod:`.middleware`: authentication before the body, the request log and metrics;
- :mod:`.routing`: which routes answer a path (``Allow``, the route template);
- :mod:`.openapi`: what FastAPI's generated document does not say by itself;
- :mod:`.routes`: one router per resource.
"""

from __future__ import annotations

from producer.http.app import create_app, openapi_document
from producer.http.openapi import INTEGER_NOTE
from producer.http.problems import PROBLEM_CODES

__all__ = ["create_app", "openapi_document", "PROBLEM_CODES", "INTEGER_NOTE"]
