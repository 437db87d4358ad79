"""Course-assigned notifications: exactly one message per learner per reset in effect (R9).

The reset batch writes one ``notifications`` row (``pending``) per notifiable learner in its own
transaction and publishes ``notifications.send [job_id]`` after commit. Then:

- :mod:`~tasks.notifications.tasks`: the ``notifications.send`` task (queue ``notifications``);
- :mod:`~tasks.notifications.sending`: one run: claim a chunk, send it through the shared rate
  limit (:mod:`tasks.ratelimit`), record the outcomes, hand the rest back after a short slice;
- :mod:`~tasks.notifications.outbox`: the rows and every change of their state (plain
  functions on a Session, no Celery), and the sweep's part;
- :mod:`~tasks.notifications.message`: what a message says, and the identifiers by which a
  provider recognises a resend (SMTP ``Message-ID``, webhook ``Idempotency-Key``);
- :mod:`~tasks.notifications.backends`: where it goes (console, SMTP, webhook).

Exactly once in effect: the outbox row is unique per (job, learner, kind); a claim is a
conditional UPDATE, so concurrent runs claim disjoint rows; a worker that dies after the
provider accepted a message but before the row was marked leaves it ``sending``, and the resend
carries the same identifiers, by which the provider drops the duplicate.
"""
