"""`bbt serve` in a child process on a free loopback port, stopped when done: for `bbt demo` and tests.

    with running_server("--model", "minilm") as server:
        HTTPBackend([server.url])

Imports no torch (the child loads the models), so the client side can start a server. The
child's stdout and stderr go to a log file (a pipe nobody reads could fill and block it);
`server.log()` returns it, and a server that dies or hangs at start-up raises BackendError with
the end of its log.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from bbt.errors import BackendError

START_TIMEOUT = 120.0  # seconds; loading MiniLM takes ~3 s alone, much more on a busy 2-core machine


@dataclass
class ServerProcess:
    url: str
    port: int
    proc: subprocess.Popen
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    """A port nothing listens on right now (another process could take it before the server does)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT,
                   cwd: str | Path | None = None, port: int | None = None) -> Iterator[ServerProcess]:
    """Start `python -m bbt.cli serve ARGS --host 127.0.0.1 --port P`, wait for /v1/health, stop it after.

    P is a free port, or `port` (to start a server again where its clients expect it).

    The server is stopped on every way out of the block (errors and Ctrl-C included): SIGTERM,
    then SIGKILL after 15 s. On Linux the child also gets SIGTERM if this process dies.
    """
    port = port or free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="bbt-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "bbt.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=cwd, env={**os.environ, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, preexec_fn=die_with_parent)
    server = ServerProcess(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=Path(log_file.name))
    try:
        wait_healthy(server, timeout)
        yield server
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        os.unlink(log_file.name)


def wait_healthy(server: ServerProcess, timeout: float = START_TIMEOUT) -> None:
    """Poll GET /v1/health until it answers 200; BackendError if the server exits or `timeout` s pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise BackendError(f"bbt serve exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise BackendError(f"bbt serve did not answer /v1/health within {timeout} s:\n{server.log()[-3000:]}")


def die_with_parent() -> None:
    """In the child: get SIGTERM when the parent dies, even by SIGKILL (Linux), so no server is orphaned.
    Linux tracks the thread that forked, not the process: a child spawned from a thread that then
    ends is stopped with it."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
