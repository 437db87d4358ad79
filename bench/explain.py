"""EXPLAIN every statement of one learner batch and one purge step (evidence for docs/performance.md).

    DATABASE_URL=postgresql://... python -m bench.explain COURSE_ID

Runs a course-wide job's first learner batch and first purge step inside a
transaction that is rolled back, records the statements they send, and prints
the PostgreSQL plan of each: every one is an index scan bounded by the course
(and by the batch's learner range or the purge's id range).
"""

from __future__ import annotations

import sys

from sqlalchemy import event, text

from models.db import get_engine
from models.schema import ResetJob
from models.states import JobScope, JobState
from models.times import utcnow
from tasks.resets.learner_batch import claim_batch, reset_batch
from tasks.resets.purge import purge_step
from tasks.resets.start import start_job

INTERESTING = ("course_assignments", "lesson_progress", "assessment_results", "discussion_posts",
               "assignment_submissions", "course_completions", "certificates", "notifications", "course_analytics")


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not argv[0].isdigit():
        print("usage: python -m bench.explain COURSE_ID", file=sys.stderr)
        return 2
    course_id = int(argv[0])
    engine = get_engine()
    captured: list[tuple[str, dict]] = []

    def capture(conn, cursor, statement, parameters, context, executemany):
        if not executemany and any(t in statement for t in INTERESTING) and "reset_batches" not in statement:
            captured.append((statement, parameters))

    from sqlalchemy.orm import Session

    with engine.connect() as conn:
        outer = conn.begin()
        session = Session(bind=conn, join_transaction_mode="create_savepoint")
        job = ResetJob(organization_id=0, course_id=course_id, scope=JobScope.COURSE, state=JobState.QUEUED, actor_id=0,
                       created_at=utcnow(), summary={}, cleared={})
        session.add(job)
        session.flush()
        start = start_job(session, job.id, 2000, purge_partitions=4)
        claim_batch(session, job.id, start.batch_nos[0], 5, 60)
        event.listen(engine, "before_cursor_execute", capture)
        reset_batch(session, job.id, start.batch_nos[0])
        # Pretend the learner phase is over to see the purge's statements.
        purge_no = session.execute(text("SELECT batch_no, cursor_row_id FROM reset_batches WHERE job_id = :j "
                                        "AND kind = 'purge' AND component = 'lesson_progress' ORDER BY batch_no"),
                                   {"j": job.id}).first()
        session.execute(text("UPDATE reset_batches SET state = 'pending' WHERE job_id = :j AND kind = 'purge'"),
                        {"j": job.id})
        purge_step(session, job.id, purge_no[0], 50000, cursor=purge_no[1])
        event.remove(engine, "before_cursor_execute", capture)
        plans = []
        for statement, params in captured:
            cursor = conn.connection.driver_connection.cursor()
            cursor.execute("EXPLAIN " + statement, params)
            plans.append((statement, [row[0] for row in cursor.fetchall()]))
        outer.rollback()
    for statement, plan in plans:
        print("-- " + " ".join(statement.split())[:160])
        for line in plan:
            print("   " + line)
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
