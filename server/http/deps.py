"""Typed dependencies: routes reach the app's state through `request.app.state`.

They are `async def` although they never wait: FastAPI runs a plain `def` dependency in its
thread pool, a hop per dependency per request that, under overload, delays even the answers
that refuse work (bench/overload_bench.py)."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Header, Request

from jobs import JobService
from server.engine import EngineNotReadyError
from server.http.errors import AdminDisabledError, UnauthorizedError
from server.http.openai.serving import OpenAIServing, model_id
from server.services.generation import GenerationService
from server.services.prompt_admin import PromptAdmin
from server.services.state import AppState
from server.settings import ANONYMOUS, Settings


async def get_state(request: Request) -> AppState:
    return request.app.state.softprompt


State = Annotated[AppState, Depends(get_state)]


async def get_settings(state: State) -> Settings:
    return state.settings


def _ready_state(state: State) -> AppState:
    if not state.ready:
        detail = f" (start-up failed: {state.boot_error})" if state.boot_error else " (the model is loading)"
        raise EngineNotReadyError("The server is not ready" + detail + ".")
    return state


async def get_generation(state: State) -> GenerationService:
    return _ready_state(state).generation


async def get_admin(state: State) -> PromptAdmin:
    return _ready_state(state).admin


async def require_admin(request: Request, state: State) -> None:
    """Admin routes need `Authorization: Bearer <SOFTPROMPT_API_KEY>` when a key is set. Without a
    key they answer only on a loopback address, unless SOFTPROMPT_ALLOW_OPEN_ADMIN says otherwise."""
    settings = state.settings
    key = settings.api_key
    if not key:
        if settings.admin_open_without_key:
            return
        raise AdminDisabledError(
            f"Admin routes are off: this server listens on {settings.host} with no SOFTPROMPT_API_KEY. Set "
            "SOFTPROMPT_API_KEY and send 'Authorization: Bearer <key>', or set SOFTPROMPT_ALLOW_OPEN_ADMIN=true "
            "to serve them to anyone who can reach it."
        )
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise UnauthorizedError("This route needs 'Authorization: Bearer <SOFTPROMPT_API_KEY>'.")


async def require_client(request: Request, state: State) -> None:
    """/generate and /v1 need a client key (or the admin key) when SOFTPROMPT_CLIENT_KEYS is set
    (server/services/tenants.py compares every key in constant time)."""
    if state.tenants.identify(request.headers.get("authorization", "")) is None:
        raise UnauthorizedError(
            "This route needs 'Authorization: Bearer <key>' with a client key "
            "(SOFTPROMPT_CLIENT_KEYS) or the admin key."
        )


async def get_openai(request: Request, state: State) -> OpenAIServing:
    """The OpenAI adapter over the ready generation service (built once, on the first /v1 request)."""
    generation = _ready_state(state).generation
    serving = getattr(request.app.state, "openai_serving", None)
    if serving is None or serving.generation is not generation:
        serving = OpenAIServing(generation, state.settings.served_model_name or model_id(state.frozen))
        request.app.state.openai_serving = serving
    return serving


async def get_jobs(request: Request) -> JobService:
    return request.app.state.jobs


async def get_tenant(request: Request) -> str:
    """The name of the client key the admission gate let this request in with (server/http/admission.py)."""
    return getattr(request.state, "tenant", ANONYMOUS)


SettingsDep = Annotated[Settings, Depends(get_settings)]
Tenant = Annotated[str, Depends(get_tenant)]
Generation = Annotated[GenerationService, Depends(get_generation)]
Admin = Annotated[PromptAdmin, Depends(get_admin)]
AdminAuth = Depends(require_admin)
ClientAuth = Depends(require_client)
OpenAI = Annotated[OpenAIServing, Depends(get_openai)]
Jobs = Annotated[JobService, Depends(get_jobs)]
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=255,
        pattern=r"^[\x21-\x7e]+$",
        description="any unique string (e.g. a UUID) of visible ASCII: a retry with the same key and the same request "
        "returns the first answer instead of doing the work twice; the same key with another request is a 422",
    ),
]
