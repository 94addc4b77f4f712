"""Bearer auth on every route of the app's route table, with the token in every wrong place.

The routes are read from the application itself (Mounts flattened), so a new route is covered
without editing this file; a path parameter the table below does not know fails the test with
its name. Public routes (/healthz, and the playground's static page and files) answer every
variant; every other route lets only `Authorization: Bearer <token>` through and answers the
rest with 401 and code 10000 (the Workers AI envelope, or OpenAI's error object under /v1).
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.routing import BaseRoute, Mount, Route

import mlx_gemma
from mlx_gemma.server import pages
from mlx_gemma.server.app import build_app
from mlx_gemma.server.service import Settings

from .support import MODEL, live_server
from .tally import count

TOKEN = "s3cret-Token_0123456789"
PATH_VALUES = {"account_id": "acct0123", "model": MODEL, "finetune": "nobody", "name": sorted(pages.ASSETS)[0]}
MISSING = "Authentication error: send the header Authorization: Bearer <token>"
WRONG = "Authentication error: the bearer token is not the server's --api-token"
CREDENTIALS: dict[str, dict[str, Any]] = {
    "none": {},
    "right": {"headers": {"Authorization": f"Bearer {TOKEN}"}},
    "wrong token": {"headers": {"Authorization": "Bearer not-the-token"}},
    "token missing its last character": {"headers": {"Authorization": f"Bearer {TOKEN[:-1]}"}},
    "token with a character more": {"headers": {"Authorization": f"Bearer {TOKEN}x"}},
    "empty bearer": {"headers": {"Authorization": "Bearer"}},
    "bare token": {"headers": {"Authorization": TOKEN}},
    "Token scheme": {"headers": {"Authorization": f"Token {TOKEN}"}},
    "Basic scheme": {"headers": {"Authorization": "Basic " + base64.b64encode(f"{TOKEN}:".encode()).decode()}},
    "X-Api-Key": {"headers": {"X-Api-Key": TOKEN}},
    "X-Auth-Key": {"headers": {"X-Auth-Key": TOKEN, "X-Auth-Email": "me@example.com"}},
    "api-key": {"headers": {"api-key": TOKEN}},
    "query string": {"params": {"token": TOKEN, "api_key": TOKEN, "access_token": TOKEN, "key": TOKEN}},
    "cookie": {"headers": {"Cookie": f"token={TOKEN}; api_key={TOKEN}"}},
}


def route_table(routes: list[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) for every route, Mounts flattened; a Mount without routes serves files."""
    for route in routes:
        if isinstance(route, Mount):
            inner = route.routes
            yield from route_table(inner, prefix + route.path) if inner else [("GET", f"{prefix}{route.path}/{{name}}")]
        elif isinstance(route, Route):
            yield from ((method, prefix + route.path) for method in sorted(route.methods - {"HEAD"}))


def concrete(template: str) -> str:
    def value(match: re.Match) -> str:
        assert match[1] in PATH_VALUES, f"route {template}: give test_auth.PATH_VALUES a value for {{{match[1]}}}"
        return PATH_VALUES[match[1]]

    return re.sub(r"\{(\w+)(?::\w+)?\}", value, template)


def is_public(template: str) -> bool:
    return template in ("/healthz", "/") or template.startswith("/playground/")


@pytest.fixture(scope="module")
def guarded(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[httpx.Client, list]]:
    app = build_app(mlx_gemma.load(tiny_dir), Settings(data_dir=tmp_path_factory.mktemp("auth"), api_token=TOKEN))
    with live_server(app) as url, httpx.Client(base_url=url, timeout=30) as http:
        yield http, sorted(set(route_table(app.routes)))


def test_the_table_holds_every_kind_of_route(guarded: tuple[httpx.Client, list]) -> None:
    templates = {template for _, template in guarded[1]}
    for expected in ("/healthz", "/metrics", "/v1/models", "/client/v4/accounts/{account_id}/ai/v1/chat/completions",
                     "/client/v4/accounts/{account_id}/ai/run/{model:path}", "/"):
        assert expected in templates


def expected_refusal(path: str, credential: str) -> dict:
    message = WRONG if "Authorization" in CREDENTIALS[credential].get("headers", {}) else MISSING
    if path.startswith("/v1/") or "/ai/v1/" in path:
        return {"error": {"message": message, "type": "authentication_error", "param": None, "code": 10000}}
    return {"result": {}, "success": False, "errors": [{"code": 10000, "message": message}], "messages": []}


@pytest.mark.parametrize("credential", sorted(CREDENTIALS))
def test_only_the_bearer_token_passes(guarded: tuple[httpx.Client, list], credential: str) -> None:
    http, table = guarded
    for method, template in table:
        path = concrete(template)
        response = http.request(method, path, **CREDENTIALS[credential])
        count("auth")
        if is_public(template):
            assert response.status_code == 200, f"{method} {path} is public: {response.status_code}"
        elif credential == "right":
            assert response.status_code != 401, f"{method} {path} refused the right token: {response.text}"
        else:
            assert (response.status_code, response.json()) == (401, expected_refusal(path, credential)), \
                f"{method} {path} with {credential}"
