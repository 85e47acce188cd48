"""py-spy on the one-worker drain (``--profile``): starting it (:func:`_profile`) and summarising
its collapsed stacks (:func:`summarise_profile`)."""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from pathlib import Path

__all__ = ["summarise_profile"]


def summarise_profile(collapsed: str, top: int = 12) -> dict:
    """Summary of a py-spy ``--format raw`` profile (collapsed stacks ``frame;frame;... count``):
    the share of samples by the package of the innermost frame, and the functions with the
    largest self time.

    >>> s = summarise_profile("main (a.py:1);run (site-packages/faust/x.py:2) 3\\n"
    ...                       "main (a.py:1);loads (json/decoder.py:9) 1\\n")
    >>> s["self_share_by_package"]
    {'faust': 0.75, 'json': 0.25}
    """
    by_package: Counter = Counter()
    by_function: Counter = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        leaf = stack.split(";")[-1]
        total += n
        by_function[leaf] += n
        by_package[_package(leaf)] += n
    if not total:
        return {"samples": 0}
    return {"samples": total,
            "self_share_by_package": {k: round(v / total, 3) for k, v in by_package.most_common()},
            "top_self": [[f, round(v / total, 3)] for f, v in by_function.most_common(top)]}


def _package(frame: str) -> str:
    m = re.search(r"\((.*?):\d+\)", frame)
    path = m.group(1) if m else frame
    if "site-packages/" in path:
        return path.split("site-packages/")[1].split("/")[0].removesuffix(".py")
    for own in ("streams", "memento"):
        if f"{own}/" in path:
            return own
    parts = path.replace("\\", "/").split("/")
    return parts[-2] if len(parts) > 1 and parts[-2] not in ("", "lib") and not parts[-2].startswith("python") \
        else parts[-1].removesuffix(".py")


def _profile(pid: int, seconds: float, out: Path) -> subprocess.Popen | None:
    spy = shutil.which("py-spy")
    if spy is None:
        return None
    return subprocess.Popen([spy, "record", "--pid", str(pid), "--duration", str(int(max(1, seconds))),
                             "--rate", "200", "--format", "raw", "--nonblocking", "--output", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
