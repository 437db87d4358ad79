"""The query string of a ``/v1/`` request: only the parameters the operation takes, each as often as it may.

A body refuses unknown fields (a typo must not silently reset a whole course), and a query
string is held to the same rules: ``GET /v1/resets?course=12`` (for ``course_id``) is a 422
naming ``course``, not every job of the organization. A parameter given twice is refused
unless it is one of the list filters the operation declares as ``list[...]`` (``state``,
``course_id``, ...: any of the values matches); a single-valued one would otherwise silently
keep one of them. Every value is text the database can store, checked as a body field is
(:func:`models.text.check_storable`), so a NUL byte is a 422 rather than a failed query.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections import Counter

from fastapi import Depends, Request
from fastapi.dependencies.utils import get_flat_dependant

from models.errors import ValidationFailed
from models.text import check_storable


def _is_list(annotation: object) -> bool:
    """``list[X]``, also inside ``Annotated`` or ``X | None``."""
    while typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_is_list(arg) for arg in typing.get_args(annotation) if arg is not type(None))
    return typing.get_origin(annotation) in (list, tuple, set, frozenset)


def declared_parameters(route) -> dict[str, bool]:
    """The query parameters ``route`` takes (its dependencies' too), each mapped to whether it takes a list."""
    dependant = get_flat_dependant(route.dependant)
    return {field.alias: _is_list(field.field_info.annotation) for field in dependant.query_params}


def _shown(name: str) -> str:
    return repr(name[:40])


def check_query(request: Request) -> None:
    """Refuse (422) unknown query parameters, repeats of single-valued ones and text that cannot be stored."""
    route = request.scope.get("route")
    if route is None or not request.query_params:
        return
    declared = declared_parameters(route)
    counts = Counter(name for name, _ in request.query_params.multi_items())
    unknown = [name for name in counts if name not in declared]
    if unknown:
        takes = ", ".join(declared) if declared else "no query parameters"
        hints = [match for name in unknown for match in difflib.get_close_matches(name, declared, n=1)]
        hint = f" (did you mean {', '.join(hints)}?)" if hints else ""
        raise ValidationFailed(f"unknown query parameter{'s' if len(unknown) > 1 else ''} "
                               f"{', '.join(map(_shown, unknown))}{hint}; this operation takes {takes}")
    repeated = [name for name, n in counts.items() if n > 1 and not declared[name]]
    if repeated:
        raise ValidationFailed(f"query parameter {', '.join(map(_shown, repeated))} given more than once; "
                               "it takes one value")
    for name, value in request.query_params.multi_items():
        check_storable(f"query parameter {name}", value)


CheckedQuery = Depends(check_query)
