"""The OpenAPI document, with what FastAPI's generated schema does not say by itself.

Clients are generated from this document, so it has to describe what the API
really does: errors are ``application/problem+json`` only, every operation may
answer 500 and 503 (and 415 when it takes a body), and integers are refused
when written as ``2.0`` although JSON Schema counts that as an integer.
``docs/openapi.json`` is this document, committed; a test compares the two.
"""

from __future__ import annotations

from http import HTTPStatus

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from producer.http.problems import PROBLEM_JSON

# Every body is JSON (415 otherwise); any endpoint may meet an internal error (500) or an
# unreachable database (503). Added to every operation by custom_openapi.
BODY_ERRORS = (415,)
SERVER_ERRORS = (500, 503)
INTEGER_NOTE = ("A JSON integer literal: a number with a fraction or an exponent (2.0, 2e0) is refused "
                "even when its value is whole; no coercion from strings either.")


def custom_openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with error responses documented as problem+json only."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, summary=app.summary,
                             description=app.description, routes=app.routes, webhooks=app.webhooks.routes)
        problem_ref = {"$ref": "#/components/schemas/Problem"}
        for path, operations in schema.get("paths", {}).items():
            for method, operation in operations.items():
                responses = operation.setdefault("responses", {})
                declared = list(SERVER_ERRORS)
                if "requestBody" in operation:
                    declared += BODY_ERRORS
                for status in declared:
                    responses.setdefault(str(status), {"description": HTTPStatus(status).phrase,
                                                       "content": {PROBLEM_JSON: {"schema": problem_ref}}})
                for status, response in responses.items():
                    content = response.get("content", {})
                    if status[0] in "45" and PROBLEM_JSON in content:
                        content.pop("application/json", None)
                for parameter in operation.get("parameters", []):
                    _note_integer(parameter.get("schema", {}), parameter)
        for name, component in schema.get("components", {}).get("schemas", {}).items():
            if name.endswith("In"):  # request bodies; responses are ours and always whole numbers
                for prop in component.get("properties", {}).values():
                    _note_integer(prop, prop)
        app.openapi_schema = schema
    return app.openapi_schema


def _note_integer(schema: dict, described: dict) -> None:
    """Say in the document what strict validation does: an integer must be written as one (2, not 2.0).

    JSON Schema counts 2.0 as an integer; the API does not. ``format: int32``
    where the range fits (ids), ``int64`` for the 64-bit ones (delivery ids), and a note in
    the description.
    """
    variants = schema.get("anyOf", [schema])
    variants = [v.get("items", {}) if v.get("type") == "array" else v for v in variants]  # list filters
    integers = [v for v in variants if v.get("type") == "integer"]
    if not integers:
        return
    for variant in integers:
        if variant.get("maximum", 2**31) <= 2**31 - 1 and variant.get("minimum", 0) >= -(2**31):
            variant.setdefault("format", "int32")
        elif variant.get("maximum", 2**63) <= 2**63 - 1 and variant.get("minimum", 0) >= -(2**63):
            variant.setdefault("format", "int64")
    if INTEGER_NOTE not in described.get("description", ""):
        described["description"] = (described.get("description", "") + " " + INTEGER_NOTE).strip()
