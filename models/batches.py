"""What a reset batch still owes, as SQL expressions shared by the pipeline and the operators' report.

- A *learner batch* owes a reset to the learners of its id range that this job has not marked
  as reset yet (:func:`learners_not_reset`).
- A *purge batch* owes the deletion of its component's pre-job rows of the course, from its
  cursor up to the job's watermark, except the rows of learners whose learner batch was
  dead-lettered: those learners were not reset, so their progress stays (:func:`rows_to_purge`).

The pipeline (``tasks.reset_steps``) runs these predicates; :func:`dead_batch_report` shows what
they still match for each dead-lettered batch, so what the runbook tells an operator to finish by
hand is, by construction, what the pipeline would have done. ``models`` never imports ``tasks``:
the producer's CLI reads the report from here.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import ColumnElement, Table, and_, column, or_, select
from sqlalchemy.orm import Session

from models.components import RESET_COMPONENTS
from models.jobs import get_job, target_filter
from models.schema import CourseAssignment, ResetBatch, ResetJob
from models.states import BatchKind, BatchState
from models.times import as_utc

assignments = CourseAssignment.__table__
batches = ResetBatch.__table__


def key_range(course_col, key_col, course_id: int, lo: int, hi: int) -> ColumnElement[bool]:
    """``lo < key <= hi`` within one course: answered by the composite index on ``(course_id, key)``."""
    return and_(course_col == course_id, key_col > lo, key_col <= hi)


def learners_not_reset(job_id: uuid.UUID, course_id: int, lo_user_id: int, hi_user_id: int) -> ColumnElement[bool]:
    """Assignments of the batch's id range ``(lo, hi]`` that job ``job_id`` has not reset yet.

    Combine with :func:`models.jobs.target_filter` for the learners the reset applies to.
    """
    a = assignments.c
    return and_(key_range(a.course_id, a.user_id, course_id, lo_user_id, hi_user_id),
                or_(a.last_reset_job_id.is_(None), a.last_reset_job_id != job_id))


def dead_learner_ranges(session: Session, job_id: uuid.UUID) -> list[tuple[int, int]]:
    """The learner id ranges ``(lo, hi]`` of the job's dead-lettered learner batches."""
    b = batches.c
    return [(int(lo), int(hi)) for lo, hi in session.execute(
        select(b.lo_user_id, b.hi_user_id)
        .where(b.job_id == job_id, b.kind == BatchKind.LEARNERS, b.state == BatchState.DEAD)
        .order_by(b.lo_user_id))]


def rows_to_purge(course_id: int, after_row_id: int, up_to_row_id: int, dead_ranges: Sequence[tuple[int, int]],
                  table: Table | None = None) -> ColumnElement[bool]:
    """A purge batch's rows still to delete: the course's rows with ``after < id <= up_to``, except
    those of learners in a dead-lettered learner batch's range (they were not reset).

    Over ``table``'s columns; without a table, over unqualified column names, for a statement
    printed for a person.
    """
    cols = table.c if table is not None else None
    course_col, id_col, user_col = ((cols.course_id, cols.id, cols.user_id) if cols is not None
                                    else (column("course_id"), column("id"), column("user_id")))
    return and_(key_range(course_col, id_col, course_id, after_row_id, up_to_row_id),
                *(~and_(user_col > lo, user_col <= hi) for lo, hi in dead_ranges))


def dead_batch_report(session: Session, job_id: str | uuid.UUID | None = None, limit: int = 50) -> list[dict]:
    """Dead-lettered batches, newest first, each with what it left undone (read-only).

    - a *learners* batch: the learners of its id range the job targets (its audience) whom it did
      not reset (``learners_not_reset``); re-run them as one-learner resets (docs/operations.md);
    - a *purge* batch: the component and the row-id range of pre-job rows still to delete, and
      the statement that finishes it by hand (``manual_sql``, the purge's own predicate).
    """
    b, j, a = batches.c, ResetJob.__table__.c, assignments.c
    query = (select(ResetBatch, j.course_id, j.state.label("job_state"), j.organization_id, j.learner_id,
                    j.completed_before)
             .join(ResetJob.__table__, j.id == b.job_id).where(b.state == BatchState.DEAD)
             .order_by(b.finished_at.desc(), b.batch_no).limit(limit))
    if job_id is not None:
        query = query.where(b.job_id == get_job(session, job_id).id)
    tables = {c.name: c.table.name for c in RESET_COMPONENTS}
    dialect = session.get_bind().dialect
    found = []
    for batch, course_id, job_state, organization_id, learner_id, completed_before in session.execute(query).all():
        item = {"job_id": str(batch.job_id), "job_state": job_state, "organization_id": organization_id,
                "course_id": course_id, "batch_no": batch.batch_no, "kind": batch.kind,
                "attempts": batch.attempts, "error": batch.error,
                "finished_at": as_utc(batch.finished_at).isoformat() if batch.finished_at else None}
        if batch.kind == BatchKind.PURGE:
            where = rows_to_purge(course_id, batch.cursor_row_id or 0, batch.hi_row_id,
                                  dead_learner_ranges(session, batch.job_id))
            rendered = where.compile(dialect=dialect, compile_kwargs={"literal_binds": True})
            table = tables.get(batch.component or "", batch.component)
            item.update(component=batch.component, after_row_id=batch.cursor_row_id, up_to_row_id=batch.hi_row_id,
                        manual_sql=f"DELETE FROM {table} WHERE {rendered};")
        else:
            learners = session.scalars(select(a.user_id).where(
                # The job's own audience: a campaign's learners, not everyone in the range.
                target_filter(course_id, learner_id, as_utc(completed_before)),
                learners_not_reset(batch.job_id, course_id, batch.lo_user_id, batch.hi_user_id),
            ).order_by(a.user_id)).all()
            item.update(learner_range=[batch.lo_user_id, batch.hi_user_id], learners_not_reset=list(learners))
        found.append(item)
    return found
