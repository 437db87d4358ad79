"""A year of finished work, seeded through bulk SQL (``python -m bench --history``; PostgreSQL only).

Into a copy of the burst scenario's base (organizations A and B, their courses and learners,
``bench/burst.py``), for 200 organizations of very different sizes (Zipf-like: A is the
busiest, B the next), over ``DAYS`` days ending now, at scale 1:

- 1,000,000 finished jobs (85 % one learner, 15 % a course of 20-284 learners; 93 % succeeded,
  4 % failed with a dead-lettered batch, 3 % cancelled) and 2,000,000 requests never confirmed
  (``expired``): 3,000,000 ``reset_jobs`` rows and a batch per finished job;
- one notification row per notified learner (90 %): about 21,000,000, 99 % sent, 1 % failed;
- the audit trail: requested (every request), confirmed and finished (every job), cancel
  requested (cancelled jobs): about 5,000,000 events;
- for the 198 other organizations, 1-5 webhook endpoints each subscribed to every job event:
  two events per finished job and one delivery per endpoint, about 1,700,000 events and
  5,000,000 deliveries (98 % delivered, 2 % failed).

Every table is written day by day in time order, as the system writes it: one organization's
rows lie scattered among everyone's. Secondary indexes and constraints are dropped for the load
and rebuilt from their own definitions, then the database is vacuumed and analysed (as
autovacuum leaves a table whose old rows no longer change). A and B get no webhook endpoints,
so the measured resets do the same work with and without the history.
"""

from __future__ import annotations

import math
import time
from datetime import datetime, timedelta, timezone

from sqlalchemy import create_engine, text
from sqlalchemy.pool import NullPool

from bench import common

DAYS = 396  # a year of listable jobs and the month before it, which the jobs window removes
ORGANIZATIONS = 200
ZIPF = 0.8
FINISHED_JOBS = 1_000_000
REQUESTS_PER_JOB = 3  # one confirmed for every two never confirmed
HISTORY_TABLES = ("reset_jobs", "reset_batches", "notifications", "audit_events", "webhook_events",
                  "webhook_deliveries")

JOBS_SQL = """
CREATE UNLOGGED TABLE hist_jobs AS
SELECT s.k, gen_random_uuid() AS id, o.org_id, o.actor_id, o.endpoints,
       o.learner_lo, o.learner_hi,
       o.courses[1 + floor(s.r4 * array_length(o.courses, 1))::int] AS course_id,
       s.finished, s.scope,
       CASE WHEN s.scope = 'learner' THEN o.learner_lo + floor(s.r5 * (o.learner_hi - o.learner_lo + 1))::int END
         AS learner_id,
       CASE WHEN NOT s.finished THEN 'expired' WHEN s.r6 < 0.93 THEN 'succeeded' WHEN s.r6 < 0.97 THEN 'failed'
            ELSE 'cancelled' END AS state,
       s.learners,
       CASE WHEN NOT s.finished THEN 0 WHEN s.scope = 'learner' THEN (s.r8 < 0.9)::int
            ELSE round(s.learners * 0.9)::int END AS notified,
       CASE WHEN s.r9 < 0.6 THEN 'http:lms' WHEN s.r9 < 0.8 THEN 'cli' ELSE 'campaign' END AS origin,
       s.created_at,
       s.created_at + make_interval(secs => 5 + s.r2 * 55) AS confirmed_at,
       s.created_at + make_interval(secs => 5.05 + s.r2 * 55) AS started_at,
       s.created_at + make_interval(secs => 5.3 + s.r2 * 55 + s.learners / 1000.0) AS finished_at
FROM (
    SELECT k, r2, r4, r5, r6, r8, r9, k % :requests_per_job = 0 AS finished,
           CASE WHEN r3 < CASE WHEN k % :requests_per_job = 0 THEN 0.85 ELSE 0.7 END THEN 'learner' ELSE 'course' END
             AS scope,
           CASE WHEN r3 < CASE WHEN k % :requests_per_job = 0 THEN 0.85 ELSE 0.7 END THEN 1
                ELSE 20 + floor(r7 * 265)::int END AS learners,
           CAST(:t_start AS timestamptz) + make_interval(secs => (k - 1 + r2) * :slot) AS created_at,
           width_bucket(r1, CAST(:cumulative AS float8[])) + 1 AS rank
    FROM (SELECT k, random() r1, random() r2, random() r3, random() r4, random() r5, random() r6, random() r7,
                 random() r8, random() r9
          FROM generate_series(1, :total) k) r
) s JOIN hist_orgs o ON o.rank = s.rank
"""

INSERT_JOBS = """
INSERT INTO reset_jobs (id, organization_id, course_id, learner_id, scope, state, actor_id, reason, origin,
    params_hash, token_hash, token_expires_at, summary, created_at, confirmed_at, published_at, started_at,
    heartbeat_at, finished_at, learners_total, learners_done, batches_total, batches_done, batches_dead, cleared,
    watermarks, purge_total, purge_done, finalized_at, cancelled_by, error)
SELECT id, org_id, course_id, learner_id, scope, state, actor_id, 'procedure changed', origin,
    md5(k::text) || md5(id::text), NULL, created_at + interval '15 minutes',
    json_build_object('learners', learners, 'completions', learners / 3, 'certificates', learners / 3,
                      'learners_to_notify', round(learners * 0.9)),
    created_at,
    CASE WHEN finished THEN confirmed_at END, CASE WHEN finished THEN confirmed_at END,
    CASE WHEN finished THEN started_at END, CASE WHEN finished THEN finished_at END,
    CASE WHEN finished THEN finished_at END,
    learners, CASE WHEN state = 'succeeded' THEN learners WHEN finished THEN learners / 2 ELSE 0 END,
    finished::int, (state IN ('succeeded', 'failed'))::int, (state = 'failed')::int,
    CASE WHEN finished THEN json_build_object('lesson_progress', learners * 12, 'assessment_results', learners / 2,
        'discussion_posts', learners / 2, 'assignment_submissions', learners / 3, 'course_completions',
        learners / 3, 'certificates', learners / 3) ELSE '{}'::json END,
    '{}'::json, 0, 0, CASE WHEN finished THEN finished_at END, CASE WHEN state = 'cancelled' THEN actor_id END,
    CASE WHEN state = 'failed' THEN 'batch 1 dead-lettered after 5 attempts: canceling statement due to lock timeout'
    END
FROM hist_jobs WHERE k >= :lo AND k < :hi ORDER BY k
"""

INSERT_BATCHES = """
INSERT INTO reset_batches (job_id, batch_no, kind, lo_user_id, hi_user_id, state, attempts, claimed_at,
    published_at, finished_at, learners_reset, cleared, error)
SELECT id, 1, 'learners', 0, 2147483647,
    CASE state WHEN 'succeeded' THEN 'done' WHEN 'failed' THEN 'dead' ELSE 'cancelled' END,
    CASE WHEN state = 'failed' THEN 5 ELSE 1 END, started_at, confirmed_at, finished_at,
    CASE WHEN state = 'succeeded' THEN learners ELSE 0 END, '{}'::json,
    CASE WHEN state = 'failed' THEN 'canceling statement due to lock timeout' END
FROM hist_jobs WHERE k >= :lo AND k < :hi AND finished ORDER BY finished_at
"""

INSERT_NOTIFICATIONS = """
INSERT INTO notifications (user_id, course_id, reset_job_id, kind, status, attempts, next_attempt_at, claimed_at,
    sent_at, provider_id, error, created_at)
SELECT CASE WHEN j.scope = 'learner' THEN j.learner_id ELSE j.learner_lo + g - 1 END, j.course_id, j.id,
    'course_assigned', CASE WHEN f.failed THEN 'failed' ELSE 'sent' END, CASE WHEN f.failed THEN 8 ELSE 1 END, NULL,
    NULL, CASE WHEN f.failed THEN NULL ELSE f.at + interval '2 seconds' END,
    CASE WHEN f.failed THEN NULL ELSE 'console-' || j.k || '-' || g END,
    CASE WHEN f.failed THEN 'gave up after 8 attempts; last error: 550 mailbox unavailable' END, f.at
FROM hist_jobs j CROSS JOIN LATERAL generate_series(1, j.notified) g
CROSS JOIN LATERAL (SELECT j.started_at + make_interval(secs => 0.05 + g * 0.0005) AS at,
                           random() < 0.01 AS failed) f
WHERE j.k >= :lo AND j.k < :hi ORDER BY f.at
"""

INSERT_AUDIT = """
INSERT INTO audit_events (organization_id, actor_id, action, course_id, learner_id, job_id, campaign_id,
    learner_count, reason, origin, details, created_at)
SELECT j.org_id, j.actor_id, e.action, j.course_id, j.learner_id, j.id, NULL, e.learner_count,
    'procedure changed', j.origin, '{}'::json, e.at
FROM hist_jobs j CROSS JOIN LATERAL (VALUES
    ('reset.requested', j.created_at, j.learners, true),
    ('reset.confirmed', j.confirmed_at, j.learners, j.finished),
    ('reset.cancel_requested', j.started_at + interval '0.1 second', j.learners / 4, j.state = 'cancelled'),
    ('reset.' || j.state, j.finished_at, CASE WHEN j.state = 'succeeded' THEN j.learners ELSE j.learners / 2 END,
     j.finished)
) e(action, at, learner_count, wanted)
WHERE j.k >= :lo AND j.k < :hi AND e.wanted ORDER BY e.at
"""

INSERT_WEBHOOKS = """
WITH events AS (
    INSERT INTO webhook_events (id, organization_id, type, job_id, payload, created_at)
    SELECT gen_random_uuid(), j.org_id, e.type, j.id,
        json_build_object('type', e.type, 'created_at', e.at, 'organization_id', j.org_id, 'data', json_build_object(
            'job_id', j.id, 'state', CASE WHEN e.type = 'reset.confirmed' THEN 'queued' ELSE j.state END,
            'scope', j.scope, 'course_id', j.course_id, 'learner_id', j.learner_id, 'campaign_id', NULL,
            'learners_total', j.learners, 'learners_done', j.learners, 'batches_total', 1, 'batches_done', 1,
            'batches_dead', 0, 'cleared', json_build_object('lesson_progress', j.learners * 12),
            'notifications', json_build_object('pending', 0, 'sent', j.notified, 'failed', 0),
            'created_at', j.created_at, 'confirmed_at', j.confirmed_at, 'started_at', j.started_at,
            'finished_at', j.finished_at, 'error', NULL, 'actor_id', j.actor_id, 'reason', 'procedure changed',
            'origin', j.origin)),
        e.at
    FROM hist_jobs j CROSS JOIN LATERAL (VALUES ('reset.confirmed', j.confirmed_at),
                                                ('reset.' || j.state, j.finished_at)) e(type, at)
    WHERE j.k >= :lo AND j.k < :hi AND j.finished AND cardinality(j.endpoints) > 0
    ORDER BY e.at
    RETURNING id, job_id, organization_id, created_at
)
INSERT INTO webhook_deliveries (event_id, endpoint_id, job_id, status, attempts, next_attempt_at, published_at,
    last_attempt_at, last_status_code, last_error, delivered_at, created_at)
SELECT ev.id, ep, ev.job_id, CASE WHEN f.failed THEN 'failed' ELSE 'delivered' END,
    CASE WHEN f.failed THEN 10 ELSE 1 END, ev.created_at, ev.created_at, ev.created_at + interval '0.2 second',
    CASE WHEN f.failed THEN 503 ELSE 200 END, CASE WHEN f.failed THEN 'HTTP 503 Service Unavailable' END,
    CASE WHEN f.failed THEN NULL ELSE ev.created_at + interval '0.3 second' END, ev.created_at
FROM events ev JOIN hist_orgs o ON o.org_id = ev.organization_id CROSS JOIN LATERAL unnest(o.endpoints) ep
CROSS JOIN LATERAL (SELECT random() < 0.02 AS failed) f
ORDER BY ev.created_at, ep
"""


def _weights() -> list[float]:
    raw = [1 / (rank ** ZIPF) for rank in range(1, ORGANIZATIONS + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def _organizations(conn, info: dict) -> list[dict]:
    """A (rank 1) and B (rank 2) as seeded, and 198 new organizations with webhook endpoints."""
    orgs = []
    for rank, key in ((1, "a"), (2, "b")):
        org = info[key]
        lo, hi = conn.execute(text("SELECT min(id), max(id) FROM users WHERE organization_id = :o AND id <> :a"),
                              {"o": org["organization_id"], "a": org["admin_id"]}).one()
        orgs.append({"rank": rank, "org_id": org["organization_id"], "actor_id": org["admin_id"],
                     "courses": org["course_ids"], "learner_lo": lo, "learner_hi": hi, "endpoints": []})
    now = datetime.now(timezone.utc)
    for rank in range(3, ORGANIZATIONS + 1):
        org_id = conn.execute(text("INSERT INTO organizations (name, time_zone) VALUES (:n, 'UTC') RETURNING id"),
                              {"n": f"History tenant {rank}"}).scalar_one()
        endpoints = [conn.execute(text(
            "INSERT INTO webhook_endpoints (organization_id, url, events, secret, created_at) VALUES "
            "(:o, :u, CAST(:e AS json), :s, :t) RETURNING id"),
            {"o": org_id, "u": f"https://hooks.example.com/tenant-{rank}/{n}", "s": f"whsec_history_{rank}_{n}",
             "e": '["reset.confirmed", "reset.succeeded", "reset.failed", "reset.cancelled"]',
             "t": now - timedelta(days=DAYS + 1)}).scalar_one() for n in range(1 + rank % 5)]
        base = 10_000_000 + rank * 100_000
        orgs.append({"rank": rank, "org_id": org_id, "actor_id": base, "courses": [base + c for c in range(1, 21)],
                     "learner_lo": base + 1, "learner_hi": base + 5_000, "endpoints": endpoints})
    return orgs


def _drop_secondary(conn, tables: tuple[str, ...]) -> list[str]:
    """Drop the tables' foreign keys, unique constraints and secondary indexes; return what rebuilds them."""
    rebuild = []
    constraints = conn.execute(text(
        "SELECT c.conrelid::regclass::text, c.conname, pg_get_constraintdef(c.oid), c.contype FROM pg_constraint c "
        "WHERE c.conrelid::regclass::text = ANY(:t) AND c.contype IN ('u', 'f') ORDER BY c.contype"),
        {"t": list(tables)}).all()
    for table, name, definition, _kind in constraints:
        conn.execute(text(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"'))
    indexes = conn.execute(text(
        "SELECT i.indexrelid::regclass::text, pg_get_indexdef(i.indexrelid) FROM pg_index i "
        "WHERE i.indrelid::regclass::text = ANY(:t) AND NOT i.indisprimary"), {"t": list(tables)}).all()
    for name, definition in indexes:
        conn.execute(text(f"DROP INDEX {name}"))
        rebuild.append(definition)
    # Unique constraints first (foreign keys may need them), then the foreign keys.
    rebuild += [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d, kind in constraints if kind == "u"]
    rebuild += [f'ALTER TABLE {t} ADD CONSTRAINT "{n}" {d}' for t, n, d, kind in constraints if kind == "f"]
    return rebuild


def seed_history(name: str, info: dict, scale: float = 1.0) -> dict:
    """Seed the history into database ``name`` (a copy of the burst base); returns counts and timings."""
    started = time.perf_counter()
    finished = max(REQUESTS_PER_JOB, round(FINISHED_JOBS * scale))
    total = finished * REQUESTS_PER_JOB
    end = datetime.now(timezone.utc) - timedelta(minutes=5)
    t_start = end - timedelta(days=DAYS)
    engine = create_engine(common.db_url(name), poolclass=NullPool, isolation_level="AUTOCOMMIT")
    timings: dict[str, float] = {}
    with engine.connect() as conn:
        conn.execute(text("SET synchronous_commit = off"))
        conn.execute(text("SET work_mem = '64MB'"))
        conn.execute(text("SET maintenance_work_mem = '512MB'"))
        conn.execute(text("SELECT setseed(0.2026)"))
        orgs = _organizations(conn, info)
        weights = _weights()
        conn.execute(text("CREATE UNLOGGED TABLE hist_orgs (rank int PRIMARY KEY, org_id int, actor_id int, "
                          "courses int[], learner_lo int, learner_hi int, endpoints int[])"))
        conn.execute(text("INSERT INTO hist_orgs VALUES (:rank, :org_id, :actor_id, :courses, :learner_lo, "
                          ":learner_hi, :endpoints)"), orgs)
        cumulative = [sum(weights[:i]) for i in range(1, ORGANIZATIONS)]
        conn.execute(text(JOBS_SQL), {"requests_per_job": REQUESTS_PER_JOB, "t_start": t_start, "total": total,
                                      "slot": DAYS * 86400 / total, "cumulative": cumulative})
        conn.execute(text("CREATE INDEX ON hist_jobs (k)"))
        conn.execute(text("ANALYZE hist_jobs"))
        timings["plan_s"] = time.perf_counter() - started
        rebuild = _drop_secondary(conn, HISTORY_TABLES)
        load_started = time.perf_counter()
        per_day = math.ceil(total / DAYS)
        for day in range(DAYS):
            bounds = {"lo": 1 + day * per_day, "hi": 1 + (day + 1) * per_day}
            for statement in (INSERT_JOBS, INSERT_BATCHES, INSERT_NOTIFICATIONS, INSERT_AUDIT, INSERT_WEBHOOKS):
                conn.execute(text(statement), bounds)
            if day % 30 == 29:
                common.log(f"history: {day + 1} of {DAYS} days written ({time.perf_counter() - started:.0f}s)")
        timings["load_s"] = time.perf_counter() - load_started
        index_started = time.perf_counter()
        for statement in rebuild:
            conn.execute(text(statement))
        timings["indexes_s"] = time.perf_counter() - index_started
        conn.execute(text(
            "INSERT INTO organization_turns (organization_id, turn_at, job_created_at, job_id) "
            "SELECT DISTINCT ON (org_id) org_id, finished_at, created_at, id FROM hist_jobs WHERE finished "
            "ORDER BY org_id, k DESC ON CONFLICT (organization_id) DO NOTHING"))
        conn.execute(text("DROP TABLE hist_jobs, hist_orgs"))
        vacuum_started = time.perf_counter()
        conn.execute(text("VACUUM ANALYZE"))
        timings["vacuum_s"] = time.perf_counter() - vacuum_started
        counts = {table: conn.execute(text(f"SELECT count(*) FROM {table}")).scalar_one() for table in HISTORY_TABLES}
        counts["finished_jobs"] = conn.execute(text(
            "SELECT count(*) FROM reset_jobs WHERE state IN ('succeeded', 'failed', 'cancelled')")).scalar_one()
        size = conn.execute(text("SELECT pg_database_size(current_database())")).scalar_one()
    engine.dispose()
    timings["total_s"] = time.perf_counter() - started
    busiest = orgs[0]["org_id"]
    endpoint = orgs[2]["endpoints"][0]
    common.log(f"history seeded in {timings['total_s']:.0f}s: {counts}, {size / 2**30:.1f} GiB")
    return {"scale": scale, "days": DAYS, "organizations": ORGANIZATIONS, "counts": counts, "timings": timings,
            "size_bytes": size, "busiest_organization": busiest, "busiest_endpoint": endpoint,
            "start": t_start.isoformat(), "end": end.isoformat()}
