"""Benchmark of a course-wide reset against the SQL floor (python -m bench)."""
