"""The FastAPI application: `create_app(settings)`; the model is loaded in the lifespan.

    softprompt serve --host 127.0.0.1 --port 8000     (settings from SOFTPROMPT_* env)

With a model spec the model loads in a background thread, so `/health` answers at once and
`/ready` turns 200 when generation can start. Tests pass an already built `frozen` model,
which is used synchronously.
"""

from __future__ import annotations

import logging
import threading
from contextlib import asynccontextmanager

from fastapi import FastAPI
from prometheus_client import CollectorRegistry
from prometheus_fastapi_instrumentator import Instrumentator, metrics

from core.modeling import FrozenModel
from jobs import JobService
from server.http.admission import AdmissionGate
from server.http.body_limit import BodySizeLimit
from server.http.errors import register_error_handlers
from server.http.openapi_responses import openai_routes_answer_400
from server.http.routes import eval as eval_routes
from server.http.routes import generate, health, openai, prompts, train
from server.http.routes.ui import mount_console
from server.services.evaluation import ResidentEvalRunner
from server.services.metrics import RequestMetrics, StateCollector, served_methods_only
from server.services.state import AppState
from server.settings import Settings

logger = logging.getLogger(__name__)

GENERATION_PATHS = ("/generate", "/v1/chat/completions", "/v1/completions")  # the routes that queue engine work
FORM_OVERHEAD = 65536  # multipart boundaries and the small form fields beside the files


def create_app(settings: Settings | None = None, *, frozen: FrozenModel | None = None) -> FastAPI:
    settings = settings or Settings()

    registry = CollectorRegistry()  # the app's own: several apps in one process never collide
    request_metrics = RequestMetrics(registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = AppState(settings, metrics=request_metrics)
        app.state.softprompt = state
        # Training jobs need no model in this process: workers load their own. Evaluations score
        # through this process's engine.
        app.state.jobs = JobService.from_settings(settings)
        app.state.jobs.eval_runner = ResidentEvalRunner(state)  # evaluations use this process's model
        app.state.jobs.fingerprint = lambda: state.frozen.fingerprint.to_dict() if state.frozen is not None else None
        app.state.jobs.start()
        state.reserved_threads = app.state.jobs.threads_in_use  # the engine leaves them free
        _log_admin_access(settings)
        if frozen is not None:
            state.boot(frozen)
        else:  # a daemon thread: a shutdown during the load does not wait for it (boot then stops early)
            # A boot that fails stops the server that runs the app (`softprompt serve` sets `stop_server`),
            # which then exits with the reason instead of answering /ready 503 for ever.
            threading.Thread(
                target=state.boot,
                kwargs={"raise_errors": False, "on_failure": getattr(app.state, "stop_server", None)},
                name="softprompt-boot",
                daemon=True,
            ).start()
        try:
            yield
        finally:
            app.state.jobs.stop()
            state.shutdown()

    app = FastAPI(
        title="softprompt-server",
        version="0.1.0",
        lifespan=lifespan,
        description="Serve EmbedGrad soft prompts for one frozen causal LM.",
    )
    app.state.metrics_registry = registry
    registry.register(StateCollector(lambda: _running_parts(app)))
    register_error_handlers(app)
    app.add_middleware(BodySizeLimit, limit_for=body_limits(settings))
    app.add_middleware(AdmissionGate, paths=GENERATION_PATHS)  # before routing: a refusal costs nothing else
    # outermost: per-route request counts, sizes and latencies (softprompt_http_*), the gate's and
    # the body limit's refusals included; /metrics itself is not counted
    http_metrics = metrics.default(metric_namespace="softprompt", registry=registry)
    Instrumentator(registry=registry, excluded_handlers=["/metrics"]).add(
        served_methods_only(http_metrics, app.openapi)
    ).instrument(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(prompts.router)
    app.include_router(train.router)
    app.include_router(eval_routes.router)
    app.include_router(openai.router)
    mount_console(app)
    openai_routes_answer_400(app)
    return app


def body_limits(settings: Settings):
    """(limit, setting) per request: the two upload routes get their upload limits, the rest one small limit."""
    uploads = {
        ("POST", "/prompts"): (settings.max_prompt_upload_bytes + FORM_OVERHEAD, "SOFTPROMPT_MAX_PROMPT_UPLOAD_BYTES"),
        ("POST", "/train"): (
            2 * settings.max_upload_bytes + FORM_OVERHEAD,
            "SOFTPROMPT_MAX_UPLOAD_BYTES, twice: data and eval_file",
        ),
        ("POST", "/eval"): (settings.max_upload_bytes + FORM_OVERHEAD, "SOFTPROMPT_MAX_UPLOAD_BYTES"),
    }
    default = (settings.max_request_bytes, "SOFTPROMPT_MAX_REQUEST_BYTES")
    return lambda method, path: uploads.get((method, path.rstrip("/") or "/"), default)


def _running_parts(app: FastAPI):
    state, jobs = getattr(app.state, "softprompt", None), getattr(app.state, "jobs", None)
    return None if state is None or jobs is None else (state, jobs)


def _log_admin_access(settings: Settings) -> None:
    if settings.api_key:
        logger.info("admin routes need the API key")
    elif settings.allow_open_admin:
        logger.warning("admin routes are open to anyone who can reach %s (SOFTPROMPT_ALLOW_OPEN_ADMIN)", settings.host)
    elif settings.admin_open_without_key:
        logger.info("admin routes answer without a key: %s is a loopback address", settings.host)
    else:
        logger.warning(
            "admin routes are off: %s is not a loopback address and no SOFTPROMPT_API_KEY is set", settings.host
        )
