"""Reading Prometheus' text exposition: what benches, tests and tools use to read a process's
``/metrics`` (parsed by :mod:`prometheus_client.parser`, the format's reference implementation).

>>> samples = parse_metrics('# HELP x y\\nm_total{type="a",p="1"} 3.0\\nm_total{type="b"} 4\\n')
>>> samples
[('m_total', {'type': 'a', 'p': '1'}, 3.0), ('m_total', {'type': 'b'}, 4.0)]
>>> metric_sum(samples, "m_total"), metric_sum(samples, "m_total", type="b")
(7.0, 4.0)
"""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

__all__ = ["Sample", "parse_metrics", "metric_sum", "scrape"]

Sample = tuple[str, dict[str, str], float]


def parse_metrics(text: str) -> list[Sample]:
    """Every sample of a text exposition, ``[(name, labels, value)]``, in order."""
    return [(s.name, dict(s.labels), float(s.value))
            for family in text_string_to_metric_families(text) for s in family.samples]


def metric_sum(samples: list[Sample], name: str, **labels: str) -> float:
    """The sum of the samples named ``name`` whose labels include ``labels`` (0 when none)."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == w for k, w in labels.items()))


def scrape(url: str, timeout: float = 2.0) -> list[Sample]:
    """The samples a ``/metrics`` endpoint at ``url`` serves now."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return parse_metrics(resp.read().decode())
