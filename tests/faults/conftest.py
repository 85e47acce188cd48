"""Fault-injection tests: each one feeds a process a fault (a poison record, a dead thread, …)
and checks that nothing acknowledged is lost and the process keeps serving. They share the
helpers of the tests one folder up."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
