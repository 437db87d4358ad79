"""Job events to subscribing services: one ``webhooks.deliver`` run per endpoint (queue ``webhooks``).

The outbox rows (``webhook_deliveries``) are written in the transaction of the job's state
change (:mod:`models.job_events`); each new row publishes ``webhooks.deliver [endpoint_id]``
after that commit. Then:

- :mod:`~tasks.webhooks.tasks`: the ``webhooks.deliver`` task;
- :mod:`~tasks.webhooks.delivering`: one run: the endpoint's due rows, one by one, for about a
  second, then the rest is handed back to the queue;
- :mod:`~tasks.webhooks.deliveries`: claiming a row and recording an attempt's outcome (the
  states, the attempt limit, the backoff and ``Retry-After``);
- :mod:`~tasks.webhooks.sending`: one attempt: sign, POST, classify the answer;
- :mod:`~tasks.webhooks.signing`: the signature headers;
- :mod:`~tasks.webhooks.wakeups`: one countdown task per endpoint for a retry falling due or a
  lease ending;
- :mod:`~tasks.webhooks.sweep`: the maintenance sweep's part, for messages the broker lost.

Guarantees: at least once with the same event id and body (receivers deduplicate on
``X-Event-Id``); in order per job and endpoint; a row is marked only after the receiver
answered, and a worker killed in between leaves it ``sending`` under a lease, after which it is
sent again.
"""
