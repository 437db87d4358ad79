"""Course-assigned notifications: the outbox sender ``notifications.send`` and its sweep hook.

The reset batch writes one ``notifications`` row (``pending``) per notifiable learner in its
own transaction and publishes ``notifications.send [job_id]`` after commit. This package turns
those rows into messages, exactly one per learner per reset in effect:

- the outbox row is unique per (job, learner, kind), so there is one row to send;
- a claim is a conditional UPDATE (``FOR UPDATE SKIP LOCKED`` on PostgreSQL), so duplicate
  ``notifications.send`` deliveries claim disjoint rows and never send one row twice at once;
- a worker that dies after the provider accepted a message but before the row was marked
  leaves it ``sending``; the sweep makes it ``pending`` again and it is resent with the same
  SMTP Message-ID / webhook Idempotency-Key (and the same webhook body), by which the provider
  recognises and drops the duplicate.

Split in two so the row logic can be used and tested without Celery:

- :mod:`tasks.notifications.outbox`: the rows (claim, marks, release, the sweep), each
  function taking a Session and never committing;
- :mod:`tasks.notifications.sender`: the task and its loop, which own the short transactions,
  the rate limit and the follow-ups.

The message is rendered in :mod:`tasks.notify_message` and delivered by :mod:`tasks.notify_backends`.
Importing this package registers the task (``workers.config`` lists ``tasks.notifications``).
"""

from __future__ import annotations

from tasks.notifications import outbox, sender
from tasks.notifications.outbox import *  # noqa: F403 - the public names, listed in outbox.__all__
from tasks.notifications.sender import *  # noqa: F403 - the task and its loop, listed in sender.__all__
from tasks.notify_message import render_notification, render_notifications

__all__ = [*outbox.__all__, *sender.__all__, "render_notification", "render_notifications"]
