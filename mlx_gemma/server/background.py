"""serving(app) -> base URL: run an ASGI app with uvicorn on a free loopback port in a thread.

Contract: `with serving(build_app(...)) as url:` starts uvicorn in a daemon thread on
127.0.0.1 and an OS-chosen free port, yields `http://127.0.0.1:<port>` once the server
accepts connections (or raises RuntimeError if uvicorn stops before that), and stops the
server (waiting up to 10 s) when the block ends. For
notebooks, benchmarks and tests that want the real HTTP stack in one process.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import uvicorn


def free_socket() -> socket.socket:
    """A loopback TCP socket bound to a free port (not yet listening)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # accepted sockets inherit it: no delayed-ACK stalls
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.contextmanager
def serving(app: Any) -> Iterator[str]:
    """Run the app with uvicorn in a thread on a free loopback port; yield its base URL."""
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    sock = free_socket()
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():  # uvicorn gave up (it logs why) before it accepted connections
            sock.close()
            raise RuntimeError(f"the server did not start: uvicorn stopped before serving {app!r} (see its log above)")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
