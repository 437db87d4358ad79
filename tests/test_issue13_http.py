"""Issue 13 over HTTP: a real uvicorn (``progress-reset serve``), a real client, real PostgreSQL.

Item 4 (text the database cannot store), item 5 (a far-future campaign start), item 8 (the
OpenAPI document and the behaviour agree: 415, OPTIONS/Allow, 500/503 declared, integers
written as integers) and the HTTP side of item 9 (a reset of nobody, the summary).
"""

from __future__ import annotations

import json

import pytest

from models.db import session_scope
from models.training import assign_course, create_user
from producer.http import INTEGER_NOTE, openapi_document
from tests.reset_checks import fingerprint
from tests.test_http_api import api_env, assert_problem, start_api, tenants  # noqa: F401 - fixtures

pytestmark = pytest.mark.e2e


def unchanged():
    with session_scope() as session:
        return fingerprint(session)


def test_item4_nul_or_lone_surrogate_in_any_text_field_is_422_and_changes_nothing(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    before = unchanged()
    body = {"actor_id": a.admin_id, "course_id": a.course_ids[0]}
    campaign = {**body, "cron": "0 9 * * 1"}
    with server.client(a.key) as api:
        for bad in ("a\u0000b", "caf\ud800"):
            # json.dumps writes both as \\u escapes, as any client would.
            raw = lambda doc: json.dumps(doc).encode()  # noqa: E731
            headers = {"content-type": "application/json"}
            for path, doc, field in (
                ("/v1/resets", {**body, "reason": bad}, "reason"),
                ("/v1/resets", {**body, "learner_id": a.plain_id, "reason": bad}, "reason"),
                ("/v1/campaigns", {**campaign, "reason": bad}, "reason"),
                ("/v1/campaigns", {**campaign, "cron": bad}, "cron"),
                ("/v1/campaigns", {**body, "every_months": 1, "start": bad}, "start"),
                ("/v1/campaigns", {**campaign, "time_zone": bad}, "time zone"),
                ("/v1/resets/00000000-0000-0000-0000-000000000000/confirm",
                 {"actor_id": a.admin_id, "token": bad}, "token"),
            ):
                problem = assert_problem(api.post(path, content=raw(doc), headers=headers), 422, "validation_failed")
                if "\u0000" in bad:
                    assert problem["detail"].startswith(f"{field} contains the NUL character"), problem
                else:  # the JSON decoder already refuses a lone surrogate, naming the field
                    assert field.replace(" ", "_") in problem["detail"], problem
    assert unchanged() == before
    assert 500 not in {r["status"] for r in server.log_events("http.request")}


def test_item5_far_future_campaign_start_is_422(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    before = unchanged()
    with server.client(a.key) as api:
        for zone in ("UTC", "America/New_York", "Pacific/Kiritimati"):
            response = api.post("/v1/campaigns", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                                       "every_months": 1, "start": "9999-12-31T23:59",
                                                       "time_zone": zone})
            problem = assert_problem(response, 422, "validation_failed")
            assert "start" in problem["detail"]
        minutely = api.post("/v1/campaigns", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                                   "cron": "* * * * *"})
        assert "at most once every 1 day" in assert_problem(minutely, 422, "validation_failed")["detail"]
    assert unchanged() == before


def test_item8_text_plain_and_form_bodies_are_415(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    before = unchanged()
    body = json.dumps({"actor_id": a.admin_id, "course_id": a.course_ids[0]})
    with server.client(a.key) as api:
        for content_type, content in (("text/plain", body), ("application/x-www-form-urlencoded",
                                                             f"actor_id={a.admin_id}&course_id={a.course_ids[0]}"),
                                      ("multipart/form-data; boundary=x", "--x--")):
            for path in ("/v1/resets", "/v1/campaigns", "/v1/campaigns/1/pause",
                         "/v1/resets/00000000-0000-0000-0000-000000000000/cancel"):
                response = api.post(path, content=content, headers={"content-type": content_type})
                problem = assert_problem(response, 415, "unsupported_media_type")
                assert "application/json" in problem["detail"]
        # JSON with a charset, and +json media types, are JSON.
        ok = api.post("/v1/resets", content=body, headers={"content-type": "application/json; charset=utf-8"})
        assert ok.status_code == 201, ok.text
    assert {r["status"] for r in server.log_events("http.request")} >= {415, 201}
    with session_scope() as session:
        after = fingerprint(session)
    assert after != before  # only the one JSON request wrote anything


def test_item8_options_and_405_list_every_method_of_the_path(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    with server.client(a.key) as api:
        options = api.options("/v1/campaigns/1")
        assert options.status_code == 204, options.text
        allow = {m.strip() for m in options.headers["allow"].split(",")}
        assert allow == {"GET", "DELETE", "OPTIONS"}, allow
        assert {m.strip() for m in api.options("/v1/campaigns").headers["allow"].split(",")} == {
            "GET", "POST", "OPTIONS"}
        assert api.options("/v1/resets").headers["allow"] == "GET, OPTIONS, POST"  # list and request
        assert_problem(api.options("/v1/nothing-here"), 404, "not_found")
        not_allowed = api.put("/v1/campaigns/1", json={})
        assert_problem(not_allowed, 405, "method_not_allowed")
        assert {m.strip() for m in not_allowed.headers["allow"].split(",")} == {"GET", "DELETE", "OPTIONS"}
        document = api.get("/openapi.json").json()
    assert set(document["paths"]["/v1/campaigns/{campaign_id}"]) == {"get", "delete"}


def test_item8_openapi_declares_415_500_503_and_strict_integers(api_env):
    document = openapi_document()
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert {"500", "503"} <= set(responses), (path, method)
            for status in ("500", "503"):
                assert list(responses[status]["content"]) == ["application/problem+json"]
            if "requestBody" in operation:
                assert "415" in responses, (path, method)
            for parameter in operation.get("parameters", []):
                schema = parameter["schema"]
                if schema.get("type") == "integer":
                    wide = schema.get("maximum", 0) > 2**31 - 1
                    assert INTEGER_NOTE in parameter["description"]
                    assert schema["format"] == ("int64" if wide else "int32"), (path, parameter["name"])
    reset_in = document["components"]["schemas"]["ResetRequestIn"]["properties"]
    assert INTEGER_NOTE in reset_in["actor_id"]["description"] and reset_in["actor_id"]["format"] == "int32"
    assert INTEGER_NOTE in reset_in["learner_id"]["description"]
    summary = document["components"]["schemas"]["ResetSummary"]["properties"]
    assert {"learners", "completions", "certificates", "learners_to_notify", "course_title", "learner_name",
            "learners_keeping_state", "irreversible"} <= set(summary)


def test_item8_integer_valued_floats_are_still_refused(api_env, tenants, start_api):
    a = tenants.a
    server = start_api(api_env)
    with server.client(a.key) as api:
        for doc in ({"actor_id": float(a.admin_id), "course_id": a.course_ids[0]},
                    {"actor_id": a.admin_id, "course_id": float(a.course_ids[0])}):
            assert_problem(api.post("/v1/resets", json=doc), 422, "validation_failed")


def test_item9_reset_of_nobody_is_422_nothing_to_reset_and_summary_names_what_is_reset(api_env, tenants,
                                                                                          start_api):
    a = tenants.a
    with session_scope() as session:
        newcomer = create_user(session, a.organization_id, "Nia Newcomer", "nia@example.com")
        assign_course(session, a.course_ids[0], newcomer.id)
        newcomer_id = newcomer.id
    server = start_api(api_env)
    before = unchanged()
    with server.client(a.key) as api:
        nobody = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                              "learner_id": newcomer_id})
        problem = assert_problem(nobody, 422, "nothing_to_reset")
        assert problem["detail"].startswith("nothing to reset: ") and "Nia Newcomer" in problem["detail"]
        assert unchanged() == before
        one = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[0],
                                           "learner_id": a.plain_id})
        assert one.status_code == 201, one.text
        summary = one.json()["summary"]
        assert summary["learners"] == 1 and summary["learner_name"] and summary["course_title"]
        assert summary["irreversible"] is True
        assert summary["learners_keeping_state"] == summary["assigned_learners"] - 1
        assert "for learner" in summary["description"] and "1 learners" not in summary["description"]
