"""Test helpers: the package's loopback server runner, under the name the live suites import, and
`asgi_post`, which drives an app directly through ASGI messages (a client that leaves part way)."""

import asyncio
from typing import Any

from mlx_gemma.server.background import free_socket, serving

__all__ = ["asgi_post", "free_socket", "serving"]


def asgi_post(app: Any, path: str, headers: list[tuple[bytes, bytes]], bodies: list[bytes],
              more_body: bool) -> list[dict]:
    """POST `bodies` (the last one final unless `more_body`), after which the client disconnects;
    return the ASGI messages the app sent back."""
    incoming = [{"type": "http.request", "body": body, "more_body": more_body or i < len(bodies) - 1}
                for i, body in enumerate(bodies)] + [{"type": "http.disconnect"}]
    sent: list[dict] = []

    async def receive() -> dict:
        return incoming.pop(0) if incoming else {"type": "http.disconnect"}

    async def send(message: dict) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 1), "server": ("t", 80)}
    asyncio.run(app(scope, receive, send))
    return sent
