"""Declarative deployments: /v1/deployments and /v1/hosts. Admin-guarded like /admin/*
(not by client API keys). The router only writes desired state to the shared Redis; the
agents on the GPU hosts make it so (engines/deepinfer_engine/agent.py) and report back.
Without --redis-url every route answers 409: deployments need a store every agent sees.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ..errors import RouterError
from ..shared.deployment import (
    DeploymentConflict,
    DeploymentNotFound,
    DeploymentSpec,
    deployment_view,
)
from ..state import RouterState
from .admin import _admin, _json

if TYPE_CHECKING:  # redis only with --redis-url
    from ..shared.deployment_store import DeploymentStore

MAX_BODY = 256 * 1024  # a spec is small; anything larger is a mistake or an attack


class ScaleRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    replicas: int = Field(ge=0, le=1024, strict=True)


def _store(state: RouterState) -> DeploymentStore:
    if state.deployments is None:
        raise RouterError(
            409, "Deployments need a shared Redis: start the router with --redis-url (and "
            "agents with deepinfer-engine agent --registry redis://...). Without one, "
            "`deepinfer-engine launch` is the single-host way.", "deployments_need_redis")
    return state.deployments


async def _body(request: web.Request) -> object:
    if request.content_length is not None and request.content_length > MAX_BODY:
        raise RouterError(413, f"Body larger than {MAX_BODY} bytes.", "body_too_large")
    raw = bytearray()
    async for chunk in request.content.iter_chunked(64 * 1024):  # to the end, bounded
        raw += chunk
        if len(raw) > MAX_BODY:
            raise RouterError(413, f"Body larger than {MAX_BODY} bytes.", "body_too_large")
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise RouterError(400, f"Malformed JSON body: {exc}", "invalid_json") from None


def _invalid(exc: ValidationError) -> RouterError:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "body"
    msg = first["msg"]
    return RouterError(422, f"Invalid deployment: {field}: {msg}", "invalid_deployment",
                       param=field)


def _unavailable(exc: Exception) -> RouterError:
    return RouterError(503, f"Deployment store unavailable: {type(exc).__name__}: {exc}",
                       "store_unavailable")


async def _view(store: DeploymentStore, dep_id: str) -> dict[str, object]:
    dep = await store.get(dep_id)
    if dep is None:
        raise RouterError(404, f"No deployment {dep_id!r}.", "deployment_not_found")
    return deployment_view(dep, await store.statuses(dep), await store.claims(dep))


@_admin
async def create_deployment(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    payload = await _body(request)
    if not isinstance(payload, dict):
        raise RouterError(422, "Invalid deployment: body: must be an object",
                          "invalid_deployment", param="body")
    try:
        spec = DeploymentSpec.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    try:
        dep, created = await store.create(spec)
        view = await _view(store, dep.id)
    except DeploymentConflict as exc:
        raise RouterError(409, str(exc), "deployment_conflict") from None
    except store.errors as exc:
        raise _unavailable(exc) from None
    return _json(view, status=201 if created else 200)


@_admin
async def list_deployments(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    try:
        deps = await store.all()
        views = [deployment_view(d, await store.statuses(d), await store.claims(d))
                 for d in deps]
    except store.errors as exc:
        raise _unavailable(exc) from None
    return _json({"deployments": views})


@_admin
async def get_deployment(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    try:
        return _json(await _view(store, request.match_info["id"]))
    except store.errors as exc:
        raise _unavailable(exc) from None


@_admin
async def patch_deployment(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    payload = await _body(request)
    if isinstance(payload, dict) and set(payload) - {"replicas"}:
        unknown = sorted(set(payload) - set(DeploymentSpec.model_fields))
        if unknown:
            raise RouterError(422, f"Invalid change: {unknown[0]}: not a deployment field",
                              "invalid_deployment", param=unknown[0])
        other = ", ".join(sorted(set(payload) - {"replicas"}))
        raise RouterError(409, f"Only replicas can change ({other} given): delete the "
                          "deployment and deploy again.", "deployment_immutable")
    try:
        scale = ScaleRequest.model_validate(payload)
    except ValidationError as exc:
        raise _invalid(exc) from None
    dep_id = request.match_info["id"]
    try:
        await store.scale(dep_id, scale.replicas)
        return _json(await _view(store, dep_id))
    except DeploymentNotFound:
        raise RouterError(404, f"No deployment {dep_id!r}.", "deployment_not_found") from None
    except DeploymentConflict as exc:
        raise RouterError(409, str(exc), "deployment_conflict") from None
    except store.errors as exc:
        raise _unavailable(exc) from None


@_admin
async def delete_deployment(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    dep_id = request.match_info["id"]
    try:
        dep = await store.delete(dep_id)
        gone = await store.get(dep_id) is None
    except DeploymentNotFound:
        raise RouterError(404, f"No deployment {dep_id!r}.", "deployment_not_found") from None
    except store.errors as exc:
        raise _unavailable(exc) from None
    return _json({"id": dep.id, "deleting": not gone, "deleted": gone}, status=202 if not gone
                 else 200)


@_admin
async def list_hosts(state: RouterState, request: web.Request) -> web.Response:
    store = _store(state)
    try:
        hosts = await store.hosts()
    except store.errors as exc:
        raise _unavailable(exc) from None
    now = time.time()
    return _json({"hosts": [
        {**h.model_dump(), "heartbeat_age_s": round(max(0.0, now - h.heartbeat_at), 1)}
        for h in hosts
    ]})


def add_routes(app: web.Application) -> None:
    """Before the proxy's catch-all POST /v1/*, so these take precedence."""
    app.router.add_post("/v1/deployments", create_deployment)
    app.router.add_get("/v1/deployments", list_deployments)
    app.router.add_get("/v1/deployments/{id}", get_deployment)
    app.router.add_patch("/v1/deployments/{id}", patch_deployment)
    app.router.add_delete("/v1/deployments/{id}", delete_deployment)
    app.router.add_get("/v1/hosts", list_hosts)
