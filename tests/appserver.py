"""A real uvicorn server for an app built in the test process, on a loopback port, in a thread.

    with serving(create_app(service, api_keys=[KEY])) as url:
        httpx.get(url + "/v1/health")

Real HTTP (timeouts, concurrent connections, keep-alive) without a subprocess: the test keeps a
handle on the app's state (quotas, fault switch) and builds each server with its own settings in
a fraction of a second. A `bbt serve` process is `serverproc.running_server`.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn


@contextmanager
def serving(app, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` on 127.0.0.1 (a socket bound here, so no port race) until the block ends; yields the URL."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
