"""Fault-injection tests: each one feeds a process a fault (a poison record, a dead thread, …)
and checks that nothing acknowledged is lost and the process keeps serving. They share the
fixtures of tests/conftest.py and the helpers of tests/support/."""
