"""The web console at /ui: static files shipped in the package (no build step), read-only without
a key; changes send the admin key the user typed in the page as the bearer header."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, FastAPI
from fastapi.responses import FileResponse, RedirectResponse
from fastapi.staticfiles import StaticFiles

UI = Path(__file__).resolve().parents[1] / "ui"

router = APIRouter(include_in_schema=False)


@router.get("/ui")
async def console() -> FileResponse:
    return FileResponse(UI / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/ui/")
async def console_slash() -> RedirectResponse:
    return RedirectResponse("/ui")


def mount_console(app: FastAPI) -> None:
    app.include_router(router)
    app.mount("/ui/static", StaticFiles(directory=UI), name="ui-static")
