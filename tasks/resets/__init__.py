"""The reset pipeline, worker side: one module per step, named for what it does.

The Celery entry points are in :mod:`tasks.resets.tasks` (queue ``resets``: ``resets.start``,
``resets.run_single``, ``resets.finalize``; queue ``reset_batches``: ``resets.work``). Each is a
few lines that call one function below. A course-wide job goes:

- :mod:`~tasks.resets.start`: ``start_next_job`` claims the queued job whose turn it is and
  writes every batch row before any runs (``plan_batches``, ``plan_purge``); a one-learner job
  runs its one batch right there;
- :mod:`~tasks.resets.wakeups`: ``wake_workers`` publishes ``resets.work`` wake-ups; a message
  is a wake-up, not an assignment;
- :mod:`~tasks.resets.work`: ``run_next_unit`` runs the unit whose turn it is
  (:mod:`~tasks.resets.turns`: organizations, then their jobs, take turns), then hands the turn on;
- :mod:`~tasks.resets.learner_batch`: ``claim_batch`` counts an attempt, ``reset_batch`` clears
  one range of learners in one transaction;
- :mod:`~tasks.resets.purge`: ``purge_step`` clears the next chunk of a large component's rows
  older than the job, in id order (decision record 0002);
- :mod:`~tasks.resets.progress`: the job's counters; the last learner batch releases the purge;
- :mod:`~tasks.resets.failures`: a unit that raised is recorded, backed off or dead-lettered;
- :mod:`~tasks.resets.finalize`: ``finalize_job``: exact analytics, totals, final state, audit;
- :mod:`~tasks.resets.cancelling`: what a cancel does once the producer asked for it;
- :mod:`~tasks.resets.one_learner`: a one-learner job's batch runs inline in its start;
- :mod:`~tasks.resets.stalled`: the maintenance sweep's part: jobs whose messages were lost.

:mod:`~tasks.resets.tables` names the tables every step writes and the batch row lock they take
first; :mod:`~tasks.resets.outcome` the result of one step.

Step functions take a ``Session`` and never commit or publish; each module's ``run_*`` (or
``*_now``) function owns the transaction of its step and publishes follow-ups after commit.
Every function is safe to run twice: idempotency lives in the database. Which rows a batch still
owes (learners not reset, rows still to purge) are predicates of :mod:`models.batches`, shared
with the operators' dead-batches report.
"""
