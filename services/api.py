"""The HTTP face of a `PolicyService`: OpenAI-compatible routes, a bearer token, size limits.

    GET  /v1/models
    POST /v1/chat/completions   (+ "objective_weights": {"Relevance": 0.7, ...}; "stream": true works)
    POST /v1/render             the conditioned prompt a request would produce (no generation)
    GET  /healthz

The body is read as bytes and parsed as JSON only: nothing a client sends is ever unpickled.
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

from services.engine import RequestRefused
from services.policy import PolicyService, RequestError

log = logging.getLogger(__name__)


def _error(status: int, message: str, param: str | None = None) -> JSONResponse:
    kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large", 503: "server_error"}.get(
        status, "invalid_request_error"
    )
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}}, status_code=status)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise RequestError(413, f"request body of {declared} bytes is over the limit of {limit}")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        # A chunked upload has no length up front: stop reading as soon as it passes the limit.
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes")
    return bytes(body)


def build_api(
    service: PolicyService, *, api_token: str | None, max_body_bytes: int, engine_status: Callable[[], dict] | None = None
) -> FastAPI:
    """`api_token`: when set, every route but /healthz needs `Authorization: Bearer <token>`.
    `engine_status`: what /healthz reports (`healthy`, request counts)."""
    app = FastAPI(title="moalign policy", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if api_token and request.url.path != "/healthz":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_token.encode()):
                return _error(401, "missing or wrong bearer token (Authorization: Bearer <token>)")
        return await call_next(request)

    @app.get("/healthz")
    async def healthz() -> JSONResponse:
        status = engine_status() if engine_status is not None else {"healthy": True}
        return JSONResponse(
            {"status": "ok" if status["healthy"] else "engine stopped", **status}, status_code=200 if status["healthy"] else 503
        )

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return service.models()

    @app.post("/v1/render")
    async def render(request: Request) -> Any:
        try:
            parsed = service.parse(await _read_body(request, max_body_bytes))
            return service.render(parsed)
        except RequestError as exc:
            return _error(exc.status, str(exc), exc.param)

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        try:
            parsed = service.parse(await _read_body(request, max_body_bytes))
            if parsed.stream:
                # Starlette stops iterating when the client disconnects; leaving the engine's
                # generator aborts the request there.
                return StreamingResponse(await service.stream(parsed), media_type="text/event-stream")
            return await service.complete(parsed)
        except RequestError as exc:
            return _error(exc.status, str(exc), exc.param)
        except RequestRefused as exc:
            return _error(422, str(exc))

    return app
