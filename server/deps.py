"""Typed dependencies: routes reach the app's state through `request.app.state`."""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, Request

from .engine import EngineNotReadyError
from .errors import UnauthorizedError
from .generation import GenerationService
from .jobs import JobManager
from .prompt_admin import PromptAdmin
from .settings import Settings
from .state import AppState


def get_state(request: Request) -> AppState:
    return request.app.state.softprompt


State = Annotated[AppState, Depends(get_state)]


def get_settings(state: State) -> Settings:
    return state.settings


def _ready_state(state: State) -> AppState:
    if not state.ready:
        detail = f" (start-up failed: {state.boot_error})" if state.boot_error else " (the model is loading)"
        raise EngineNotReadyError("The server is not ready" + detail + ".")
    return state


def get_generation(state: State) -> GenerationService:
    return _ready_state(state).generation


def get_admin(state: State) -> PromptAdmin:
    return _ready_state(state).admin


def require_admin(request: Request, state: State) -> None:
    """Admin routes need `Authorization: Bearer <SOFTPROMPT_API_KEY>` when a key is set."""
    key = state.settings.api_key
    if not key:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
        raise UnauthorizedError("This route needs 'Authorization: Bearer <SOFTPROMPT_API_KEY>'.")


def get_jobs(request: Request) -> JobManager:
    return request.app.state.jobs


SettingsDep = Annotated[Settings, Depends(get_settings)]
Generation = Annotated[GenerationService, Depends(get_generation)]
Admin = Annotated[PromptAdmin, Depends(get_admin)]
AdminAuth = Depends(require_admin)
Jobs = Annotated[JobManager, Depends(get_jobs)]
