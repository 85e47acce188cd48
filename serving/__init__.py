"""HTTP serving of the retrieval policy: retrieve the nearest cases, score them with Q, sample
from softmax(Q/α), log the propensity, hot-reload checkpoints, append new cases.

Entry point for ``memento serve``: :func:`serving.cli.add_arguments` and
:func:`serving.cli.run_from_args` (re-exported here).
"""

from serving.cli import add_arguments, run_from_args

__all__ = ["add_arguments", "run_from_args"]
