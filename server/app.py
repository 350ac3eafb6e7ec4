"""The FastAPI application: `create_app(settings)`; the model is loaded in the lifespan.

    softprompt serve --host 127.0.0.1 --port 8000     (settings from SOFTPROMPT_* env)

With a model spec the model loads in a background thread, so `/health` answers at once and
`/ready` turns 200 when generation can start. Tests pass an already built `frozen` model,
which is used synchronously.
"""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager

from fastapi import FastAPI

from trainer.modeling import FrozenModel

from .errors import register_error_handlers
from .jobs import JobManager
from .routes import generate, health, prompts, train
from .settings import Settings
from .state import AppState


def create_app(settings: Settings | None = None, *, frozen: FrozenModel | None = None) -> FastAPI:
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        state = AppState(settings)
        app.state.softprompt = state
        # Training jobs need no model in this process: workers load their own.
        app.state.jobs = JobManager(settings.store, model_spec=settings.model, device=settings.device,
                                    threads=settings.train_threads, max_running=settings.train_concurrency)
        app.state.jobs.start()
        state.reserved_threads = app.state.jobs.threads_in_use  # the engine leaves them free
        booting = None
        if frozen is not None:
            state.boot(frozen)
        else:
            booting = asyncio.create_task(asyncio.to_thread(state.boot, raise_errors=False))
        try:
            yield
        finally:
            if booting is not None and not booting.done():
                await asyncio.wait([booting], timeout=300)
            app.state.jobs.stop()
            state.shutdown()

    app = FastAPI(title="softprompt-server", version="0.1.0", lifespan=lifespan,
                  description="Serve EmbedGrad soft prompts for one frozen causal LM.")
    register_error_handlers(app)
    app.include_router(health.router)
    app.include_router(generate.router)
    app.include_router(prompts.router)
    app.include_router(train.router)
    return app
