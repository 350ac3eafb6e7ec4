"""Liveness, readiness, counters and Prometheus metrics (these routes never need a key)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.http.deps import State
from server.http.openapi_responses import PROMETHEUS_TEXT, error_responses

router = APIRouter(tags=["health"])


@router.get("/health")
def health(state: State) -> dict:
    """Liveness: the process answers (the model may still be loading)."""
    return {"status": "ok", "ready": state.ready, "model_loads": state.model_loads}


@router.get("/ready", responses=error_responses(503))
def ready(state: State):
    """Readiness: 200 once the model is loaded and the engine runs, else 503. `store` reports
    whether the prompt store answers; a store that is away keeps the replica ready (prompts
    already loaded serve), while store operations answer 503 `store_unavailable`."""
    if state.ready:
        return {"status": "ready", "model_loads": state.model_loads, "store": state.store_status()}
    message = f"start-up failed: {state.boot_error}" if state.boot_error else "the model is loading"
    return JSONResponse({"error": {"code": "not_ready", "message": message}}, status_code=503)


@router.get("/stats")
def stats(state: State) -> dict:
    """Counters: model loads, batches, largest batch seen, prefix/prompt cache hits and misses."""
    return state.stats()


@router.get("/metrics", response_class=Response, responses=PROMETHEUS_TEXT)
async def metrics(request: Request) -> Response:
    """Prometheus metrics: request latencies and token counts by prompt name, queue, caches,
    prompt loads, training jobs, HTTP requests per route (docs/metrics.md lists them all)."""
    return Response(generate_latest(request.app.state.metrics_registry), media_type=CONTENT_TYPE_LATEST)
