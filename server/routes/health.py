"""Liveness, readiness and counters."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from ..deps import State
from ..openapi_responses import error_responses

router = APIRouter(tags=["health"])


@router.get("/health")
def health(state: State) -> dict:
    """Liveness: the process answers (the model may still be loading)."""
    return {"status": "ok", "ready": state.ready, "model_loads": state.model_loads}


@router.get("/ready", responses=error_responses(503))
def ready(state: State):
    """Readiness: 200 once the model is loaded and the engine runs, else 503."""
    if state.ready:
        return {"status": "ready", "model_loads": state.model_loads}
    message = f"start-up failed: {state.boot_error}" if state.boot_error else "the model is loading"
    return JSONResponse({"error": {"code": "not_ready", "message": message}}, status_code=503)


@router.get("/stats")
def stats(state: State) -> dict:
    """Counters: model loads, batches, largest batch seen, prefix/prompt cache hits and misses."""
    return state.stats()
