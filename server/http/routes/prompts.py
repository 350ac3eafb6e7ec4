"""Prompt management: list, show, alias, upload, delete (admin routes need the API key)."""

from __future__ import annotations

from fastapi import APIRouter, File, Form, Query, Response, UploadFile
from starlette.concurrency import run_in_threadpool

from server.http.deps import Admin, AdminAuth, IdempotencyKey
from server.http.openapi_responses import error_responses
from server.http.schemas import AliasRequest

router = APIRouter(tags=["prompts"])


@router.get("/prompts", responses=error_responses(503))
async def list_prompts(admin: Admin) -> dict:
    """Every prompt name with its versions (metadata included) and the aliases."""
    return await run_in_threadpool(admin.list)


@router.get("/prompts/{ref}", responses=error_responses(404, 422, 503))
async def show_prompt(ref: str, admin: Admin) -> dict:
    """One version (`math-v2`, `math` = newest, or an alias) with its metadata and compatibility."""
    return await run_in_threadpool(admin.show, ref)


@router.post(
    "/prompts", status_code=201, dependencies=[AdminAuth], responses=error_responses(400, 401, 403, 409, 413, 422, 503)
)
async def upload_prompt(
    admin: Admin,
    name: str = Form(description="prompt name; the upload becomes its next version"),
    file: UploadFile = File(
        description="safetensors with 'prompt_embeddings' [P, D], or a zip of a PEFT adapter folder"
    ),
    idempotency_key: IdempotencyKey = None,
) -> dict:
    data = await file.read(admin.max_upload_bytes + 1)
    return await run_in_threadpool(admin.upload, name, file.filename or "", data, idempotency_key=idempotency_key)


@router.put(
    "/aliases/{alias}", dependencies=[AdminAuth], responses=error_responses(400, 401, 403, 404, 409, 413, 422, 503)
)
async def set_alias(alias: str, body: AliasRequest, admin: Admin) -> dict:
    """Point (or move) `alias` at the version `target` resolves to now."""
    return await run_in_threadpool(admin.set_alias, alias, body.target)


@router.delete(
    "/aliases/{alias}", status_code=204, dependencies=[AdminAuth], responses=error_responses(401, 403, 404, 422, 503)
)
async def remove_alias(alias: str, admin: Admin) -> Response:
    await run_in_threadpool(admin.remove_alias, alias)
    return Response(status_code=204)


@router.delete("/prompts/{ref}", dependencies=[AdminAuth], responses=error_responses(401, 403, 404, 409, 422, 503))
async def delete_prompt(
    ref: str, admin: Admin, force: bool = Query(False, description="also remove aliases pointing at it")
) -> dict:
    """Delete one version (`math-v2`) or every version of a name (`math`)."""
    return {"deleted": await run_in_threadpool(admin.delete, ref, force=force)}
