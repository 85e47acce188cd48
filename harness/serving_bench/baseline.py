"""The baseline server: a trivial aiohttp server (parse the JSON, check ``user_id``, answer a fixed
recommendation) with serving's event loop, the cost of HTTP alone on the machine."""

from __future__ import annotations

import json

from harness.serving_bench.control import bad_request, serve_workers

__all__ = ["serve_baseline"]


async def _baseline_recommend(request):
    from aiohttp import web

    body = json.loads(await request.read())
    problem = bad_request(body)
    if problem is not None:
        return web.json_response(problem, status=422)
    return web.json_response({"request_id": "0" * 32, "user_id": body["user_id"], "item_id": "item0",
                              "items": ["item0"], "case_id": "case0", "propensity": 1.0,
                              "policy_version": 0, "ts": body.get("ts", 0.0)})


async def _baseline_ready(request):
    from aiohttp import web

    return web.json_response({"ready": True})


def _baseline_worker(port: int, reuse_port: bool, worker_index: int = 0) -> None:
    from aiohttp import web

    from serving.cli import serve_app

    app = web.Application()
    app.router.add_post("/v1/recommend", _baseline_recommend)
    app.router.add_get("/readyz", _baseline_ready)
    serve_app(app, "127.0.0.1", port, reuse_port=reuse_port)


def serve_baseline(port: int, workers: int = 1) -> None:
    """A trivial aiohttp server (parse JSON, check ``user_id``, answer a fixed recommendation)
    on ``port`` with ``workers`` processes and serving's event loop; runs until SIGTERM."""
    serve_workers(_baseline_worker, port, workers)
