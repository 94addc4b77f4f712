"""build_app(runtime, settings) -> the Starlette application of `mlx-gemma serve`.

Contract: mounts the Workers AI routes (workers_ai.py), the OpenAI routes (openai.py),
`GET /healthz`, `GET /metrics` (Prometheus text, metrics.py) and the browser playground (pages.py:
the page at `GET /`, its files at `GET /playground/<name>`). A path ending in "/" (other than "/")
is served exactly as the same path without that one slash (`POST .../ai/finetunes/` creates a
fine-tune), on every route; nothing answers with a slash-adding or slash-removing 307 redirect.
With `settings.api_token`, every route but /healthz and the playground's page and files needs
`Authorization: Bearer <token>`, the scheme in any case (else 401, code 10000, with
`WWW-Authenticate: Bearer`). Every ApiError becomes the Workers AI error envelope with its status
(OpenAI's error object under a /v1/ path); a 404 or 405 from routing becomes the same envelope (codes
7000 and 7001), and a 405 carries `Allow` naming every method served at that path. An unexpected
exception becomes a 500 envelope and is logged, and the server keeps serving. With
`settings.allowed_origins` (`serve --allowed-origins`), scripts on those pages may call every route
from a browser (CORS, preflight included, before the token check); without, no CORS header is sent.
"""

from __future__ import annotations

import hmac
import logging
import re
from collections.abc import Mapping
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Match, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from ..lora.store import FinetuneStore
from ..runtime import Runtime
from . import openai, pages, workers_ai
from .schema import ApiError, as_api_error, failure, unauthorized
from .service import Service, Settings

log = logging.getLogger("mlx_gemma.server")
OPENAI_UNDER_ACCOUNT = re.compile(r"/client/v4/accounts/[^/]+/ai/v1/")
PUBLIC_PATHS = {"/healthz", *pages.PUBLIC_PATHS}  # the page holds no data; its API calls need the token


def is_openai_path(path: str) -> bool:
    """/v1/... or /client/v4/accounts/{id}/ai/v1/..., not a Workers AI path that merely contains /ai/v1/."""
    return path.startswith("/v1/") or OPENAI_UNDER_ACCOUNT.match(path) is not None


def error_response(path: str, status: int, code: int, message: str,
                   headers: Mapping[str, str] | None = None) -> JSONResponse:
    if is_openai_path(path):
        return JSONResponse(openai.error_body(status, code, message), status, headers=headers)
    return JSONResponse(failure(code, message), status, headers=headers)


async def api_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(request.url.path, exc.status, exc.code, exc.message)


def allowed_methods(routes: list[BaseRoute], scope: Scope) -> set[str]:
    """Every method some route serves at this path (Starlette's own Allow names only the first such route)."""
    methods: set[str] = set()
    for route in routes:
        match, child = route.matches(scope)
        if match is Match.NONE:
            continue
        if isinstance(route, Mount):
            methods |= allowed_methods(route.routes, {**scope, **child})
        elif isinstance(route, Route):
            methods |= route.methods or set()
    return methods


def top_scope(scope: Scope) -> Scope:
    """The request as the router first saw it (a Mount's match rewrote root_path in the shared scope)."""
    root = scope.get("app_root_path", scope.get("root_path", ""))
    return {"type": "http", "method": scope["method"], "path": scope["path"], "root_path": root}


async def http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    code = 7000 if exc.status_code == 404 else 7001  # Cloudflare's "no route" / "method not allowed"
    message = f"{request.method} {request.url.path}: {exc.detail}"
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (methods := allowed_methods(request.app.routes, top_scope(request.scope))):
        headers["Allow"] = ", ".join(sorted(methods))
    return error_response(request.url.path, exc.status_code, code, message, headers)


async def server_error(request: Request, exc: Exception) -> Response:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    error = as_api_error(exc)
    return error_response(request.url.path, error.status, error.code, error.message)


class StripTrailingSlash:
    """ASGI middleware: `/a/b/` is routed as `/a/b` (path and raw_path); `/` stays as it is. Only a
    slash sent as such counts: a percent-encoded one (`%2F`, part of a model name) is kept."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, raw = scope.get("path", ""), scope.get("raw_path")
        sent = raw if isinstance(raw, bytes) else path.encode()
        if scope["type"] in ("http", "websocket") and len(path) > 1 and path.endswith("/") and sent.endswith(b"/"):
            scope = {**scope, "path": path[:-1]}
            if isinstance(raw, bytes):
                scope["raw_path"] = raw[:-1]
        await self.app(scope, receive, send)


class BearerAuth:
    """ASGI middleware: every path but PUBLIC_PATHS needs `Authorization: Bearer <token>` (scheme in any case)."""

    def __init__(self, app: ASGIApp, token: str):
        self.app = app
        self.expected = token.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in PUBLIC_PATHS or self._allowed(scope):
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization")
        reason = ("send the header Authorization: Bearer <token>" if given is None
                  else "the bearer token is not the server's --api-token")
        error = unauthorized(reason)
        response = error_response(scope["path"], error.status, error.code, error.message,
                                  {"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)

    def _allowed(self, scope: Scope) -> bool:
        scheme, _, token = dict(scope["headers"]).get(b"authorization", b"").partition(b" ")
        return scheme.lower() == b"bearer" and hmac.compare_digest(token.lstrip(b" "), self.expected)


async def healthz(request: Request) -> Response:
    service: Service = request.app.state.service
    engine = service.runtime.engine
    return JSONResponse({"status": "ok", "model": service.runtime.name, "served": service.served_models(),
                         "active": engine.active, "waiting": engine.waiting})


async def metrics(request: Request) -> Response:
    from .metrics import render

    body, content_type = render(request.app.state.service)
    return Response(body, media_type=content_type)


def build_app(runtime: Runtime, settings: Settings, store: FinetuneStore | None = None) -> Starlette:
    routes = [Route("/healthz", healthz, methods=["GET"]), Route("/metrics", metrics, methods=["GET"]),
              *workers_ai.routes(), *openai.routes(), *pages.routes()]
    handlers: dict[Any, Any] = {ApiError: api_error, HTTPException: http_error, Exception: server_error}
    app = Starlette(routes=routes, exception_handlers=handlers)
    app.router.redirect_slashes = False  # StripTrailingSlash does it; a redirect would loop (/v1 <-> /v1/)
    app.state.service = Service(runtime, settings, store)
    if settings.api_token:
        app.add_middleware(BearerAuth, token=settings.api_token)
    if settings.allowed_origins:  # outside the token check: a browser's preflight carries no token
        app.add_middleware(CORSMiddleware, allow_origins=settings.allowed_origins, allow_headers=["*"],
                           allow_methods=["GET", "POST", "DELETE"], max_age=3600)
    app.add_middleware(StripTrailingSlash)  # added last, so it runs first: auth sees the stripped path
    return app
