"""Listing jobs (``GET /v1/resets``, ``progress-reset jobs list``): keyset pages, filters, organizations.

Tier (a) against real PostgreSQL (rolled back), then the real uvicorn server and the CLI.
"""

from __future__ import annotations

import json
from datetime import timedelta

import pytest
from sqlalchemy import func, select

from models.db import session_scope
from models.errors import ValidationFailed
from models.schema import ResetJob
from models.times import utcnow
from models.training import create_course, create_organization, create_user
from producer import resets
from producer.pages import encode_cursor
from tests.listing_support import insert_jobs
from tests.test_http_api import (  # noqa: F401 - fixtures
    api_env,
    assert_problem,
    run_cli,
    start_api,
    tenants,
)


def _org(session, name):
    org = create_organization(session, name)
    admin = create_user(session, org.id, "Admin", f"admin-{org.id}@example.com",
                        permissions=("platform.users", "training.manage"))
    course = create_course(session, org.id, "Course")
    return org, admin, course


def walk(session, organization_id, limit, between_pages=None, **filters) -> list[dict]:
    items, cursor, pages = [], None, 0
    while True:
        page = resets.list_jobs(session, organization_id, limit=limit, cursor=cursor, **filters)
        assert len(page["items"]) <= limit
        items.extend(page["items"])
        pages += 1
        cursor = page["next_cursor"]
        if cursor is None:
            return items
        if between_pages is not None:
            between_pages(pages)


def test_pages_return_each_job_once_newest_first_while_jobs_are_created(db_session):
    org, admin, course = _org(db_session, "Lister")
    other, other_admin, other_course = _org(db_session, "Other")
    ids = insert_jobs(db_session, org.id, course.id, admin.id, 1000)
    insert_jobs(db_session, other.id, other_course.id, other_admin.id, 50)
    added = []

    def create_more(page_no):
        added.extend(insert_jobs(db_session, org.id, course.id, admin.id, 7, start=utcnow() + timedelta(
            seconds=page_no), origin="between"))

    items = walk(db_session, org.id, 100, between_pages=create_more)
    seen = [item["job_id"] for item in items]
    assert len(seen) == len(set(seen)) == 1000, "each job exactly once"
    assert set(seen) == {str(i) for i in ids}, "the jobs that existed at the first page; nothing of another org"
    assert added, "jobs were created between pages"
    keys = [(item["created_at"], item["job_id"]) for item in items]
    assert keys == sorted(keys, reverse=True), "newest first, ties by id"

    # A second walk from the top sees the new jobs first.
    first = resets.list_jobs(db_session, org.id, limit=5)["items"]
    assert {f["job_id"] for f in first} <= {str(a) for a in added}


def test_filters_narrow_the_listing(db_session):
    org, admin, course = _org(db_session, "Filters")
    second = create_course(db_session, org.id, "Second")
    base = utcnow() - timedelta(days=10)
    insert_jobs(db_session, org.id, course.id, admin.id, 40, start=base, step=timedelta(hours=1), same_instant=1)
    on_second = insert_jobs(db_session, org.id, second.id, admin.id, 8, start=base, origin="campaign")
    everything = walk(db_session, org.id, 200)
    assert len(everything) == 48

    assert {i["job_id"] for i in walk(db_session, org.id, 3, course_id=second.id)} == {str(i) for i in on_second}
    assert {i["course_id"] for i in walk(db_session, org.id, 200, origin="campaign")} == {second.id}
    for state in ("succeeded", "expired"):
        found = walk(db_session, org.id, 7, state=state)
        assert found and all(i["state"] == state for i in found)
        assert len(found) == sum(1 for i in everything if i["state"] == state)
    after, before = base + timedelta(hours=10), base + timedelta(hours=20)
    window = walk(db_session, org.id, 4, course_id=course.id, created_after=after.isoformat(),
                  created_before=before.isoformat())
    assert len(window) == 10  # hours 10..19: after is inclusive, before exclusive
    assert walk(db_session, org.id, 10, learner_id=admin.id) == []
    assert walk(db_session, org.id, 10, campaign_id=12345) == []


def test_bad_listing_input_is_refused_with_one_clear_line(db_session):
    org, _admin, _course = _org(db_session, "Bad input")
    before = db_session.scalar(select(func.count()).select_from(ResetJob))
    for kwargs, fragment in (
        ({"limit": 0}, "limit must be between 1 and 200"),
        ({"limit": 201}, "limit must be between 1 and 200"),
        ({"state": "done"}, "state must be one of"),
        ({"created_after": "yesterday"}, "created_after must be an ISO-8601"),
        ({"cursor": "not-a-cursor"}, "cursor is not valid"),
        ({"cursor": encode_cursor("2026-01-01T00:00:00+00:00")}, "cursor is not valid"),
        ({"cursor": encode_cursor("garbage", "also garbage")}, "cursor is not valid"),
        ({"origin": "x" * 65}, "origin must be 1 to 64"),
    ):
        with pytest.raises(ValidationFailed) as refused:
            resets.list_jobs(db_session, org.id, **kwargs)
        assert fragment in str(refused.value) and "\n" not in str(refused.value)
    assert db_session.scalar(select(func.count()).select_from(ResetJob)) == before


# --- over HTTP and the CLI --------------------------------------------------------------------------

@pytest.mark.e2e
def test_http_listing_of_1000_jobs_in_pages_of_100_while_requests_arrive(api_env, tenants, start_api):
    a, b = tenants.a, tenants.b
    with session_scope() as session:
        ids = {str(i) for i in insert_jobs(session, a.organization_id, a.course_ids[0], a.admin_id, 1000)}
        insert_jobs(session, b.organization_id, b.course_ids[0], b.admin_id, 30)
    server = start_api(api_env)
    seen, cursor, created = [], None, []
    with server.client(a.key) as api:
        while True:
            params = {"limit": 100} | ({"cursor": cursor} if cursor else {})
            page = api.get("/v1/resets", params=params)
            assert page.status_code == 200, page.text
            body = page.json()
            assert set(body) == {"items", "next_cursor"} and len(body["items"]) <= 100
            seen.extend(item["job_id"] for item in body["items"])
            cursor = body["next_cursor"]
            if not cursor:
                break
            # A real request (a new job row, awaiting confirmation) between two pages.
            made = api.post("/v1/resets", json={"actor_id": a.admin_id, "course_id": a.course_ids[1]})
            assert made.status_code == 201, made.text
            created.append(made.json()["request_id"])
        assert len(seen) == len(set(seen)) == 1000 and set(seen) == ids and len(created) == 9

        newest = api.get("/v1/resets", params={"limit": 9, "state": "awaiting_confirmation"}).json()["items"]
        assert [i["job_id"] for i in newest] == created[::-1]
        assert {i["origin"] for i in newest} == {f"http:{a.key_name}"}

        # Malformed values: 422 problem documents naming the parameter.
        for params, fragment in (({"limit": 0}, "limit"), ({"limit": 500}, "limit"), ({"course_id": "x"}, "course_id"),
                                 ({"state": "nope"}, "state must be one of"), ({"cursor": "%%%"}, "cursor"),
                                 ({"created_before": "soon"}, "created_before")):
            problem = assert_problem(api.get("/v1/resets", params=params), 422, "validation_failed")
            assert fragment in problem["detail"]

    # Organization B's key sees only its own jobs; A's course id is simply an empty filter there.
    with server.client(b.key) as api:
        theirs = api.get("/v1/resets", params={"limit": 200}).json()
        assert len(theirs["items"]) == 30 and not ({i["job_id"] for i in theirs["items"]} & ids)
        assert api.get("/v1/resets", params={"course_id": a.course_ids[0]}).json() == {"items": [],
                                                                                     "next_cursor": None}


@pytest.mark.e2e
def test_cli_jobs_list_pages_like_the_api(api_env, tenants):
    a = tenants.a
    with session_scope() as session:
        ids = {str(i) for i in insert_jobs(session, a.organization_id, a.course_ids[0], a.admin_id, 25)}
    seen, cursor = [], None
    while True:
        args = ["jobs", "list", "--organization", str(a.organization_id), "--limit", "10", "--json"]
        done = run_cli(api_env, *args, *(["--cursor", cursor] if cursor else []))
        assert done.returncode == 0, done.stderr
        page = json.loads(done.stdout)
        seen.extend(i["job_id"] for i in page["items"])
        cursor = page["next_cursor"]
        if not cursor:
            break
    assert len(seen) == 25 and set(seen) == ids
    human = run_cli(api_env, "jobs", "list", "--organization", str(a.organization_id), "--limit", "2")
    assert human.returncode == 0 and "more: --cursor" in human.stdout
    bad = run_cli(api_env, "jobs", "list", "--organization", str(a.organization_id), "--state", "done")
    assert bad.returncode == 1 and bad.stderr.startswith("error: state must be one of") \
        and len(bad.stderr.strip().splitlines()) == 1
