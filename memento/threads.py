"""How many threads a process's numerical libraries may use.

Every process here works on small matrices (one request's 64–80 candidates through a 128-wide
MLP, a batch of 64 transitions), where a BLAS library's thread pool costs far more than it
saves, and on a host whose cores are shared by the broker, the stream worker, the learner and
serving, a spinning pool waits for cores the others hold: numpy's OpenBLAS scoring one request
took 0.1 ms on one thread and 1–10 ms on its default two (docs/benchmarks.md). torch keeps a
pool of its own. :func:`limit_threads` caps both (threadpoolctl for the BLAS libraries).

>>> limit_threads(1)
>>> import torch; torch.get_num_threads()
1
"""

from __future__ import annotations

__all__ = ["limit_threads"]


def limit_threads(n: int) -> None:
    """Cap this process's BLAS libraries (numpy's OpenBLAS, any other loaded) and torch's
    intra-op pool at ``n`` threads, from now on."""
    if n < 1:
        raise ValueError(f"limit_threads: n must be >= 1, got {n}")
    import torch
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=n, user_api="blas")
    torch.set_num_threads(n)
