"""Calls out of the system (webhook receivers, notification providers), and what bounds them.

- :mod:`~tasks.outbound.courier`: the calls run on background threads of the worker process,
  off its pool, in lanes with caps (one organization's receivers never hold another's);
- :mod:`~tasks.outbound.deadline`: one total deadline per call, and a bounded answer;
- :mod:`~tasks.outbound.http`: an HTTP POST within its deadline, to the checked address;
- :mod:`~tasks.outbound.signatures`: Standard Webhooks signatures;
- :mod:`~tasks.outbound.answers`: ``Retry-After``, and reasons kept free of e-mail addresses.
"""
