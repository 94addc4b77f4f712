"""The browser playground: the static page at `GET /` and its files under `/playground/`.

Contract: `routes()` serves `playground/index.html` at `/` and each file named in ASSETS at
`/playground/<name>` (any other name: 404), with `cache-control: no-cache` and a
Content-Security-Policy that allows this origin only: the page loads nothing from elsewhere
(no CDN, no web font) and works offline. PUBLIC_PATHS are exactly these URLs: app.py serves
them without a bearer token, since a browser navigation cannot send one and the files hold no
data; every API call the page makes still needs the token.
"""

from __future__ import annotations

from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import BaseRoute, Route

PLAYGROUND_DIR = Path(__file__).resolve().parent / "playground"
ASSETS = {"app.js": "text/javascript; charset=utf-8", "playground.css": "text/css; charset=utf-8"}
PUBLIC_PATHS = frozenset({"/", *(f"/playground/{name}" for name in ASSETS)})
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                           "connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")
HEADERS = {"cache-control": "no-cache", "x-content-type-options": "nosniff"}


async def page(request: Request) -> Response:
    headers = {**HEADERS, "content-security-policy": CONTENT_SECURITY_POLICY}
    return FileResponse(PLAYGROUND_DIR / "index.html", media_type="text/html; charset=utf-8", headers=headers)


async def asset(request: Request) -> Response:
    name = request.path_params["name"]
    if name not in ASSETS:
        raise HTTPException(404, f"the playground has no file {name!r}")
    return FileResponse(PLAYGROUND_DIR / name, media_type=ASSETS[name], headers=HEADERS)


def routes() -> list[BaseRoute]:
    return [Route("/", page, methods=["GET"]), Route("/playground/{name}", asset, methods=["GET"])]
