"""The thin producer: validation, two-step confirmation, the job ledger, enqueue after commit.

Front ends: the Python API (``producer.resets``), the CLI (``producer.cli``) and
the HTTP API (``producer.http``). All of them call the same service functions.
"""
