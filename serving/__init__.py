"""HTTP serving of the retrieval policy: retrieve the nearest cases, score them with Q, sample
from softmax(Q/α), log the propensity, hot-reload checkpoints, append new cases.

Entry point for ``memento serve``: :func:`serving.cli.add_arguments` and
:func:`serving.cli.run_from_args` (also reachable as ``serving.add_arguments`` /
``serving.run_from_args``); ``memento bench serving``: :mod:`harness.serving_bench`.
"""

__all__ = ["add_arguments", "run_from_args"]


def __getattr__(name: str):
    # Lazy, so that ``python -m serving.cli`` does not import serving.cli twice.
    if name in __all__:
        from serving import cli

        return getattr(cli, name)
    raise AttributeError(f"module 'serving' has no attribute {name!r}")
