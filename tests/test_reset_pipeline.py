"""The reset pipeline's plain functions, each test on PostgreSQL and on SQLite (``pipeline_db``).

R4-R9 checked against SQL recomputation; duplicates of every step; cancel;
dead-lettering; the audience filter; a row the purge cannot delete.
"""

from __future__ import annotations

import uuid
from datetime import timedelta

import pytest
from sqlalchemy import func, select, text

from models import analytics
from models.dialect import is_postgres
from models.schema import (
    AssessmentResult,
    AuditEvent,
    Certificate,
    CourseAssignment,
    CourseCompletion,
    CourseItem,
    LessonProgress,
    ResetBatch,
    ResetJob,
)
from models.seed import seed
from models.times import utcnow
from models.training import record_activity
from producer import resets
from tasks.resets.failures import fail_purge_step, record_batch_error
from tasks.resets.finalize import finalize_job
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.purge import purge_step
from tasks.resets.start import start_job
from tests.db_backends import pipeline_db  # noqa: F401 - the fixture
from tests.reset_checks import assert_reset_exact, drain_purge, run_job_in_process, snapshot, targeted


@pytest.fixture
def org(pipeline_db):
    return seed(pipeline_db, learners=300, lessons=5, courses=2, completed_ratio=0.4, random_seed=7)


def confirmed_job(session, actor, course, learner=None, **kw):
    req = resets.request(session, actor, course, learner_id=learner, reason="procedure changed", **kw)
    return resets.confirm(session, req.request_id, actor, req.token).job_id


def run_learner_phase(session, job_id, batch_size=1000):
    """Start the job and run every learner batch; returns the purge batches released (one chain each)."""
    start = start_job(session, job_id, batch_size, purge_partitions=1)
    released = []
    for no in start.batch_nos:
        claim_batch(session, job_id, no, 5, 60)
        released += reset_batch(session, job_id, no).purge
    return released


def run_all(session, job_id, batch_size=40):
    """Drive the job through every step in-process, as the tasks would."""
    return run_job_in_process(session, job_id, batch_size, chunk_rows=300)


def test_course_wide_reset_is_exact(pipeline_db, org):
    course, other = org.course_ids
    before = snapshot(pipeline_db, org.course_ids)
    wanted = targeted(before, course)
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    result = run_all(pipeline_db, job_id)
    assert result.state == "succeeded" and result.drift is None
    assert_reset_exact(pipeline_db, before, job_id, course, wanted)

    st = resets.status(pipeline_db, job_id)
    assert st["state"] == "succeeded"
    assert st["learners_total"] == st["learners_done"] == len(wanted)
    assert st["batches_total"] == st["batches_done"] > 1
    assert st["cleared"]["course_completions"] == sum(1 for (c, _), s in before.items()
                                                      if c == course and s.status == "completed")
    assert st["notifications"]["pending"] > 0
    # R7: after a whole-course reset the completion rate reads 0%.
    assert analytics.read_analytics(pipeline_db, course).completion_rate == 0.0
    assert analytics.read_analytics(pipeline_db, other).completion_rate > 0.0


def test_one_learner_reset_touches_only_that_learner(pipeline_db, org):
    course = org.course_ids[0]
    before = snapshot(pipeline_db, org.course_ids)
    learner = org.learner_id  # seeded as completed
    assert before[(course, learner)].status == "completed"
    job_id = confirmed_job(pipeline_db, org.admin_id, course, learner)
    assert run_all(pipeline_db, job_id).state == "succeeded"
    assert_reset_exact(pipeline_db, before, job_id, course, {learner})
    st = resets.status(pipeline_db, job_id)
    assert (st["scope"], st["batches_total"], st["learners_done"]) == ("learner", 1, 1)


def test_every_step_delivered_twice_changes_nothing_more(pipeline_db, org):
    course = org.course_ids[0]
    before = snapshot(pipeline_db, org.course_ids)
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    start = start_job(pipeline_db, job_id, 40)
    assert not start_job(pipeline_db, job_id, 40).started  # second start: nothing
    released = []
    for no in start.batch_nos:
        for _ in range(2):
            claim = claim_batch(pipeline_db, job_id, no, 5, 60)
            if claim.runnable:
                released += reset_batch(pipeline_db, job_id, no).purge
        # A redelivery after the batch committed finds it done.
        assert not claim_batch(pipeline_db, job_id, no, 5, 60).runnable
        assert reset_batch(pipeline_db, job_id, no).status == "skipped"
    assert released, "the last learner batch releases the purge"
    assert not finalize_job(pipeline_db, job_id).finished  # purge still to run
    for batch_no, cursor in released:
        while True:
            step = purge_step(pipeline_db, job_id, batch_no, 300, cursor=cursor)
            # The same message delivered again (same cursor) is refused.
            assert purge_step(pipeline_db, job_id, batch_no, 300, cursor=cursor).status == "skipped"
            if step.status != "progressed":
                break
            cursor = step.cursor
    assert finalize_job(pipeline_db, job_id).finished
    assert not finalize_job(pipeline_db, job_id).finished
    assert_reset_exact(pipeline_db, before, job_id, course, targeted(before, course))
    audits = pipeline_db.scalars(select(AuditEvent.action).where(AuditEvent.job_id == ResetJob.id)
                                .where(ResetJob.id == AuditEvent.job_id)).all()
    assert audits.count("reset.succeeded") == 1


def test_learners_without_progress_are_untouched_and_not_notified(pipeline_db, org):
    course = org.course_ids[0]
    before = snapshot(pipeline_db, org.course_ids)
    idle = {u for (c, u), s in before.items() if c == course and s.status == "not_started"}
    assert idle
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    run_all(pipeline_db, job_id)
    after = snapshot(pipeline_db, org.course_ids)
    assert all(after[(course, u)] == before[(course, u)] for u in idle)


def test_completed_again_after_reset_gets_a_new_certificate(pipeline_db, org):
    course = org.course_ids[0]
    learner = org.learner_id
    old_number = pipeline_db.scalar(select(Certificate.number).where(Certificate.course_id == course,
                                                                    Certificate.user_id == learner))
    assert old_number
    job_id = confirmed_job(pipeline_db, org.admin_id, course, learner)
    run_all(pipeline_db, job_id)
    # R5: nothing of the past completion can be shown afterwards.
    assert pipeline_db.scalar(select(func.count()).select_from(CourseCompletion).where(
        CourseCompletion.course_id == course, CourseCompletion.user_id == learner)) == 0
    later = utcnow() + timedelta(days=3)
    for item_id in pipeline_db.scalars(select(CourseItem.id).where(CourseItem.course_id == course)
                                      .order_by(CourseItem.position)):
        result = record_activity(pipeline_db, course, learner, item_id, at=later, score=90.0)
    assert result.completed_now and result.attempt == 2
    cert = pipeline_db.scalars(select(Certificate).where(Certificate.course_id == course,
                                                        Certificate.user_id == learner)).one()
    assert cert.number != old_number and cert.attempt == 2
    assert analytics.read_analytics(pipeline_db, course) == analytics.count_from_rows(pipeline_db, course)


def test_audit_keeps_the_fact_not_the_data(pipeline_db, org):
    course = org.course_ids[0]
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    run_all(pipeline_db, job_id)
    events = pipeline_db.scalars(select(AuditEvent).where(AuditEvent.course_id == course)
                                .order_by(AuditEvent.id)).all()
    actions = [e.action for e in events]
    assert actions == ["reset.requested", "reset.confirmed", "reset.succeeded"]
    done = events[-1]
    assert done.actor_id == org.admin_id and done.reason == "procedure changed"
    assert done.learner_count == resets.status(pipeline_db, job_id)["learners_done"]
    assert done.details == {}


def test_cancel_stops_remaining_batches_and_counts_the_done(pipeline_db, org):
    course = org.course_ids[0]
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    start = start_job(pipeline_db, job_id, 40)
    first = start.batch_nos[0]
    claim_batch(pipeline_db, job_id, first, 5, 60)
    done = reset_batch(pipeline_db, job_id, first).learners
    st = resets.cancel(pipeline_db, job_id, org.admin_id)
    assert st["state"] == "cancelling" and st["learners_done"] == done and st["finished_at"] is None
    reset_ids = set(pipeline_db.scalars(select(CourseAssignment.user_id).where(
        CourseAssignment.course_id == course, CourseAssignment.last_reset_job_id == uuid.UUID(job_id))).all())
    assert len(reset_ids) == done
    assert finalize_job(pipeline_db, job_id).finished  # the clean-up of a cancelled job
    st = resets.status(pipeline_db, job_id)
    assert st["state"] == "cancelled" and st["finished_at"] is not None
    # Learners already reset lost everything of the course (R5); the others kept theirs.
    left = dict(pipeline_db.execute(select(LessonProgress.user_id, func.count()).where(
        LessonProgress.course_id == course).group_by(LessonProgress.user_id)).all())
    assert not reset_ids & set(left) and left
    # A batch message arriving after the cancel does nothing.
    second = start.batch_nos[1]
    assert not claim_batch(pipeline_db, job_id, second, 5, 60).runnable
    assert analytics.read_analytics(pipeline_db, course) == analytics.count_from_rows(pipeline_db, course)
    states = pipeline_db.scalars(select(ResetBatch.state).where(ResetBatch.job_id == ResetJob.id)
                                .where(ResetJob.id == uuid.UUID(st["job_id"]))).all()
    assert states.count("done") == 1
    assert states.count("cancelled") == len(start.batch_nos) - 1 + st["purge_batches_total"]


def test_a_batch_that_keeps_failing_is_dead_lettered_and_the_job_fails_naming_it(pipeline_db, org):
    course = org.course_ids[0]
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    start = start_job(pipeline_db, job_id, 100)
    poison, *healthy = start.batch_nos
    for attempt in range(1, 3):
        claim = claim_batch(pipeline_db, job_id, poison, max_attempts=2, lease_seconds=60)
        assert claim.runnable and claim.attempts == attempt
        record_batch_error(pipeline_db, job_id, poison, "IntegrityError: learner 42 is broken")
    dead = claim_batch(pipeline_db, job_id, poison, max_attempts=2, lease_seconds=60)
    assert dead.dead and not dead.runnable and not dead.job_complete
    for no in healthy:
        claim_batch(pipeline_db, job_id, no, 2, 60)
        last = reset_batch(pipeline_db, job_id, no)
    assert drain_purge(pipeline_db, job_id, last.purge, 300)
    result = finalize_job(pipeline_db, job_id)
    assert result.state == "failed"
    st = resets.status(pipeline_db, job_id)
    assert f"batch {poison}" in st["error"] and "learner 42 is broken" in st["error"]
    assert st["batches_dead"] == 1 and st["batches_done"] == st["batches_total"] - 1
    assert analytics.read_analytics(pipeline_db, course) == analytics.count_from_rows(pipeline_db, course)
    # The poison batch's learners were not reset, so the purge kept their rows.
    poison_batch = pipeline_db.get(ResetBatch, (uuid.UUID(job_id), poison))
    kept = pipeline_db.scalar(select(func.count()).select_from(LessonProgress).where(
        LessonProgress.course_id == course, LessonProgress.user_id > poison_batch.lo_user_id,
        LessonProgress.user_id <= poison_batch.hi_user_id))
    assert kept > 0
    others = pipeline_db.scalar(select(func.count()).select_from(LessonProgress).where(
        LessonProgress.course_id == course, LessonProgress.user_id > poison_batch.hi_user_id))
    assert others == 0


def test_audience_filter_resets_only_old_completions(pipeline_db, org):
    course = org.course_ids[0]
    a = snapshot(pipeline_db, org.course_ids)
    rows = pipeline_db.execute(select(CourseAssignment.user_id, CourseAssignment.completed_at)
                              .where(CourseAssignment.course_id == course,
                                     CourseAssignment.status == "completed")).all()
    cutoff = sorted(r.completed_at for r in rows)[len(rows) // 2]
    old = {r.user_id for r in rows if r.completed_at < cutoff}
    job = ResetJob(organization_id=org.organization_id, course_id=course, scope="course", state="queued",
                   actor_id=org.admin_id, origin="campaign", completed_before=cutoff, created_at=utcnow(),
                   summary={}, cleared={})
    pipeline_db.add(job)
    pipeline_db.flush()
    job_id = str(job.id)
    assert run_all(pipeline_db, job_id).state == "succeeded"
    assert_reset_exact(pipeline_db, a, job_id, course, old)


def test_not_started_learners_have_no_progress_rows(pipeline_db, org):
    """The invariant the deferred purge relies on (decision 0002): rows imply progress."""
    before = snapshot(pipeline_db, org.course_ids)
    assert any(s.status == "not_started" for s in before.values())
    for key, state in before.items():
        if state.status == "not_started":
            assert sum(state.rows) == 0, f"{key} has rows while not started"
        else:
            assert state.rows[0] > 0 or state.status == "in_progress"


def test_a_row_the_purge_cannot_delete_holds_back_only_itself(pipeline_db, org):
    """A chunk that failed is retried in halving sets: the other rows go, the stuck one is named."""
    course = org.course_ids[0]
    stuck_id = pipeline_db.scalar(select(func.min(AssessmentResult.id)).where(AssessmentResult.course_id == course))
    refusal = f"row {stuck_id} is held by a legal hold"
    if is_postgres(pipeline_db):
        pipeline_db.execute(text(
            "CREATE FUNCTION refuse_delete() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            f"IF OLD.id = {stuck_id} THEN RAISE EXCEPTION '{refusal}'; END IF; RETURN OLD; END $$"))
        pipeline_db.execute(text("CREATE TRIGGER hold BEFORE DELETE ON assessment_results "
                                 "FOR EACH ROW EXECUTE FUNCTION refuse_delete()"))
    else:
        pipeline_db.execute(text(f"CREATE TRIGGER hold BEFORE DELETE ON assessment_results "
                                 f"FOR EACH ROW WHEN OLD.id = {stuck_id} BEGIN SELECT RAISE(ABORT, '{refusal}'); END"))
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    released = run_learner_phase(pipeline_db, job_id)
    purge_no = pipeline_db.scalar(select(ResetBatch.batch_no).where(
        ResetBatch.job_id == uuid.UUID(job_id), ResetBatch.component == "assessment_results"))
    cursor = dict(released)[purge_no]
    with pytest.raises(Exception, match="legal hold"), pipeline_db.begin_nested():
        purge_step(pipeline_db, job_id, purge_no, 100_000, cursor=cursor)
    failure = fail_purge_step(pipeline_db, job_id, purge_no, "legal hold", max_attempts=5)
    assert (failure.dead, failure.job_complete, failure.attempts) == (False, False, 1)
    step = purge_step(pipeline_db, job_id, purge_no, 100_000, cursor=cursor)
    while step.status == "progressed":
        step = purge_step(pipeline_db, job_id, purge_no, 100_000, cursor=step.cursor)
    assert step.status == "done"
    others = [(n, c) for n, c in released if n != purge_no]
    drain_purge(pipeline_db, job_id, others, 100_000)
    result = finalize_job(pipeline_db, job_id)
    assert result.state == "failed"
    error = resets.status(pipeline_db, job_id)["error"]
    assert f"batch {purge_no}" in error and str(stuck_id) in error and "legal hold" in error
    left = pipeline_db.scalars(select(AssessmentResult.id).where(AssessmentResult.course_id == course)).all()
    assert left == [stuck_id]


def test_a_purge_message_behind_the_cursor_does_nothing_and_the_next_claim_goes_on(pipeline_db, org):
    """A purge step that names a cursor the batch has moved past is a stale duplicate and does
    nothing; the rest is taken by whichever claim comes next (``resets.work`` runs it without a cursor)."""
    course = org.course_ids[0]
    job_id = confirmed_job(pipeline_db, org.admin_id, course)
    released = run_learner_phase(pipeline_db, job_id)
    batch_no = pipeline_db.scalar(select(ResetBatch.batch_no).where(
        ResetBatch.job_id == uuid.UUID(job_id), ResetBatch.component == "lesson_progress"))
    first = dict(released)[batch_no]
    step = purge_step(pipeline_db, job_id, batch_no, 200, cursor=first)
    assert step.status == "progressed" and step.cursor > first
    assert pipeline_db.get(ResetBatch, (uuid.UUID(job_id), batch_no)).state == "pending"
    assert purge_step(pipeline_db, job_id, batch_no, 200, cursor=first).status == "skipped"
    following = purge_step(pipeline_db, job_id, batch_no, 200)
    assert following.status in ("progressed", "done") and following.cursor > step.cursor
