"""The same-work reference of ``memento bench serving``: the irreducible work of a
recommendation, and nothing else.

A request to ``/v1/recommend`` here does what serving cannot avoid doing, with the same parts
serving uses, one request at a time:

1. parse the JSON body and encode the state from ``context.recent_items``
   (:class:`memento.encoder.StateEncoder`);
2. search the same case bank for the ``top_k`` nearest cases, opened as serving opens it (same
   index, same nprobe: :meth:`serving.app.ServingConfig.open_bank`);
3. score them with the same numpy Q network (:class:`memento.qnet.FrozenQ` of a network shaped
   like the learner's) and sample one from softmax(Q/α);
4. send one record of the size serving sends (state and case features, packed) through a producer with
   serving's settings (:data:`serving.publisher.PRODUCER_OPTIONS`), and answer.

No micro-batching, user histories, own cases, retrieval priors, validation beyond ``user_id``,
metrics, auth, followers or generator: the difference between serving and this server under
the same load is what those cost. Run it as ``python -m harness.serving_bench reference --port P``
with the settings in the environment (``Settings.from_env``); ``/readyz`` answers once the
bank is open.
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from harness.serving_bench.control import bad_request, serve_workers

__all__ = ["ReferenceRecommender", "serve_reference"]

log = logging.getLogger(__name__)


class ReferenceRecommender:
    """The irreducible work of one recommendation (see the module's docstring).

    Parameters
    ----------
    bank
        The serving case bank (``memory_store.CaseBank``).
    net
        The Q network (copied into a :class:`memento.qnet.FrozenQ`).
    items
        The item encoder of the states.
    top_k, alpha
        Candidates searched and μ's temperature, as serving's.

    >>> import torch
    >>> from memento.encoder import ItemEncoder
    >>> from memento.qnet import QNetwork
    >>> from memory_store import CaseBank
    >>> items = ItemEncoder(4)
    >>> bank = CaseBank(None, dim=4)
    >>> _ = bank.add_arrays(["a", "b"], items.encode_many(["x", "y"]), ["x", "y"], items.encode_many(["x", "y"]), 1.0, 0.0)
    >>> _ = torch.manual_seed(0)
    >>> ref = ReferenceRecommender(bank, QNetwork(4, hidden=8), items, top_k=2, alpha=0.1)
    >>> answer, record = ref.recommend({"user_id": "u", "context": {"recent_items": [{"item_id": "x"}]}},
    ...                                np.random.default_rng(0))
    >>> from memento.schemas import unpack_vector
    >>> answer["item_id"] in ("x", "y"), len(unpack_vector(json.loads(record)["case_features"]))
    (True, 9)
    """

    def __init__(self, bank, net, items, top_k: int, alpha: float):
        from memento.encoder import StateEncoder
        from memento.qnet import FrozenQ

        self.bank = bank
        self.q = FrozenQ(net)
        self.states = StateEncoder(items)
        self.top_k = top_k
        self.alpha = np.float32(alpha)

    def recommend(self, body: dict, rng: np.random.Generator) -> tuple[dict, bytes]:
        """(the answer, the record to publish) for one request body."""
        from memento.encoder import HistoryEntry
        from memento.schemas import pack_vector

        recent = body.get("context", {}).get("recent_items", [])
        history = [HistoryEntry(str(e["item_id"]), str(e.get("action", "click")), float(e.get("ts", 0.0)))
                   for e in recent]
        state = self.states.encode(history)[None]
        ids, _, features, mask = self.bank.search_with_features(state, self.top_k)
        n = int(mask[0].sum())
        q = self.q(state, features[:, :n])[0]
        z = q / self.alpha
        p = np.exp(z - z.max())
        p /= p.sum()
        chosen = min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), n - 1)
        case_id = ids[0][chosen]
        item = self.bank.get(case_id).item_id
        answer = {"user_id": body["user_id"], "item_id": item, "case_id": case_id,
                  "propensity": float(p[chosen])}
        record = json.dumps({**answer, "state": pack_vector(state[0]),
                             "case_features": pack_vector(features[0, chosen])}, separators=(",", ":")).encode()
        return answer, record


def _reference_worker(port: int, reuse_port: bool, worker_index: int = 0) -> None:
    from aiohttp import web

    from memento.config import Settings
    from memento.encoder import ItemEncoder
    from memento.kafka_io import make_producer
    from memento.qnet import QNetwork
    from memento.threads import limit_threads
    from serving.app import ServingConfig, serving_bank_path
    from serving.cli import serve_app
    from serving.publisher import PRODUCER_OPTIONS

    settings = Settings.from_env()
    config = ServingConfig()
    limit_threads(config.compute_threads)
    bank = config.open_bank(serving_bank_path(settings.data_dir, worker_index), settings.state_dim)
    producer = make_producer(settings, **PRODUCER_OPTIONS)
    ref = ReferenceRecommender(bank, QNetwork(settings.state_dim), ItemEncoder(settings.item_dim),
                               top_k=config.options.top_k, alpha=config.options.alpha)
    rng = np.random.default_rng(worker_index)
    topic = settings.topics.recommendations

    async def recommend(request):
        body = json.loads(await request.read())
        problem = bad_request(body)
        if problem is not None:
            return web.json_response(problem, status=422)
        answer, record = ref.recommend(body, rng)
        producer.send(topic, key=body["user_id"], value=record)
        answer["ts"] = body.get("ts", time.time())
        return web.json_response(answer)

    async def ready(request):
        return web.json_response({"ready": True, "cases": len(bank)})

    async def cleanup(app):
        producer.close(5)
        bank.close()

    app = web.Application()
    app.router.add_post("/v1/recommend", recommend)
    app.router.add_get("/readyz", ready)
    app.on_cleanup.append(cleanup)
    serve_app(app, "127.0.0.1", port, reuse_port=reuse_port)


def serve_reference(port: int, workers: int = 1) -> None:
    """The reference server on ``port`` with ``workers`` processes (worker i opens the bank
    serving's worker i opens); runs until SIGTERM."""
    serve_workers(_reference_worker, port, workers)
