"""The dead-batches report (``models.batches.dead_batch_report``) is built on the pipeline's own
predicates: what it lists is what the pipeline left undone, and its statement finishes a purge."""

from __future__ import annotations

import uuid
from datetime import datetime, timedelta, timezone

from sqlalchemy import func, select, text, update

from models.batches import dead_batch_report
from models.components import RESET_COMPONENTS
from models.schema import CourseAssignment, ResetBatch, ResetJob
from models.seed import seed
from producer import resets
from tasks.resets.failures import fail_purge_step, record_batch_error
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.purge import purge_step
from tasks.resets.start import start_job
from tests.db_backends import pipeline_db  # noqa: F401 - the fixture


def _job_with_a_dead_learner_batch_and_a_dead_purge_batch(session):
    org = seed(session, learners=120, lessons=4, courses=1, completed_ratio=0.5, random_seed=31)
    course = org.course_ids[0]
    req = resets.request(session, org.admin_id, course, reason="dead batches")
    job_id = resets.confirm(session, req.request_id, org.admin_id, req.token).job_id
    poison, *healthy = start_job(session, job_id, batch_size=40, purge_partitions=1).batch_nos
    assert claim_batch(session, job_id, poison, max_attempts=1, lease_seconds=60).runnable
    record_batch_error(session, job_id, poison, "IntegrityError: learner is broken")
    assert claim_batch(session, job_id, poison, max_attempts=1, lease_seconds=60).dead
    released = []
    for no in healthy:
        claim_batch(session, job_id, no, 5, 60)
        released += reset_batch(session, job_id, no).purge
    purge_no = session.scalar(select(ResetBatch.batch_no).where(
        ResetBatch.job_id == uuid.UUID(job_id), ResetBatch.component == "lesson_progress"))
    step = purge_step(session, job_id, purge_no, 50, cursor=dict(released)[purge_no])
    assert step.status == "progressed"
    assert fail_purge_step(session, job_id, purge_no, "OperationalError: lock timeout", 1).dead
    return org, course, job_id, poison, purge_no


def test_the_report_lists_what_each_dead_batch_left(pipeline_db):
    org, course, job_id, poison, purge_no = _job_with_a_dead_learner_batch_and_a_dead_purge_batch(pipeline_db)
    report = dead_batch_report(pipeline_db, job_id)
    assert dead_batch_report(pipeline_db) == report  # the only job with dead batches
    found = {item["batch_no"]: item for item in report}
    assert set(found) == {poison, purge_no}

    batch = pipeline_db.get(ResetBatch, (uuid.UUID(job_id), poison))
    a = CourseAssignment.__table__.c
    with_progress = pipeline_db.scalars(select(a.user_id).where(
        a.course_id == course, a.status != "not_started", a.user_id > batch.lo_user_id,
        a.user_id <= batch.hi_user_id).order_by(a.user_id)).all()
    assert with_progress and found[poison]["learners_not_reset"] == with_progress
    assert found[poison]["learner_range"] == [batch.lo_user_id, batch.hi_user_id]

    purge = found[purge_no]
    assert purge["component"] == "lesson_progress" and purge["after_row_id"] < purge["up_to_row_id"]
    assert f"NOT (user_id > {batch.lo_user_id} AND user_id <= {batch.hi_user_id})" in purge["manual_sql"]
    # Run by hand, the statement does what the purge would have: only the dead batch's learners
    # keep pre-job rows.
    pipeline_db.execute(text(purge["manual_sql"]))
    table = next(c.table for c in RESET_COMPONENTS if c.name == "lesson_progress")
    left = pipeline_db.scalars(select(func.distinct(table.c.user_id)).where(
        table.c.course_id == course, table.c.id <= purge["up_to_row_id"])).all()
    assert left and all(batch.lo_user_id < user <= batch.hi_user_id for user in left)


def test_the_report_lists_only_learners_of_the_jobs_audience(pipeline_db):
    """A campaign's job targets learners who completed before a date: the learners of a dead batch's
    range outside that audience were never to be reset, so the runbook must not list them."""
    org, course, job_id, poison, _purge_no = _job_with_a_dead_learner_batch_and_a_dead_purge_batch(pipeline_db)
    everyone = dead_batch_report(pipeline_db, job_id)
    listed = next(item for item in everyone if item["batch_no"] == poison)["learners_not_reset"]
    pipeline_db.execute(update(ResetJob).where(ResetJob.id == uuid.UUID(job_id))
                        .values(completed_before=datetime.now(timezone.utc) + timedelta(days=1)))
    a = CourseAssignment.__table__.c
    completed = set(pipeline_db.scalars(select(a.user_id).where(a.course_id == course, a.status == "completed")))
    audience = next(item for item in dead_batch_report(pipeline_db, job_id)
                    if item["batch_no"] == poison)["learners_not_reset"]
    assert audience == [user for user in listed if user in completed]
    assert 0 < len(audience) < len(listed)
