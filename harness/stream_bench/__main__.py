"""``python -m harness.stream_bench [options]``: the bench, as ``memento bench stream``;
``python -m harness.stream_bench agent ...``: the trivial agent, a child process of the baseline
phases (:func:`harness.stream_bench.command.main`)."""

from __future__ import annotations

import sys

from harness.stream_bench.command import main

if __name__ == "__main__":
    sys.exit(main())
