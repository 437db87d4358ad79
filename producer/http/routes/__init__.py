"""The HTTP API's endpoints, one router per resource.

Each route is a thin call into the service function the CLI calls too, inside
one transaction (:func:`models.db.session_scope`, or
:func:`producer.http.deps.session_as` when the request names an acting user),
so the rules exist once and a route holds no logic of its own: parse, check
the actor belongs to the key's organization, call, return. :func:`producer.http.app.create_app` includes the routers in the
order the OpenAPI document lists them.
"""
