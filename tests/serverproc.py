"""A real `bbt serve` in a subprocess on a free loopback port, for tests and benchmarks.

    with running_server("--model", "minilm", env={"BBT_TEST_FAULTS": "1"}) as server:
        httpx.get(server.url + "/v1/health")

    server = shared_server()   # one keyed test server per test session, shared by the test modules

The server's stdout and stderr go to a log file (a pipe nobody reads could fill and block it);
`server.log()` returns it, and a server that dies at start-up raises with its log in the message.
"""

from __future__ import annotations

import atexit
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
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
def running_server(*args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT):
    """Start `python -m bbt.cli serve ARGS --host 127.0.0.1 --port P`, wait for /v1/health, stop it after."""
    port = free_port()
    log_file = tempfile.NamedTemporaryFile(prefix="bbt-serve-", suffix=".log", delete=False)
    cmd = [sys.executable, "-m", "bbt.cli", "serve", *args, "--host", "127.0.0.1", "--port", str(port)]
    proc = subprocess.Popen(cmd, cwd=REPO, env={**os.environ, **(env or {})}, stdout=log_file, stderr=subprocess.STDOUT,
                            preexec_fn=_die_with_parent)
    server = ServerProcess(url=f"http://127.0.0.1:{port}", port=port, proc=proc, log_path=Path(log_file.name))
    try:
        _wait_healthy(server, timeout)
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


def _wait_healthy(server: ServerProcess, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.proc.poll() is not None:
            raise RuntimeError(f"bbt serve exited with {server.proc.returncode}:\n{server.log()[-3000:]}")
        try:
            if httpx.get(server.url + "/v1/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"bbt serve did not answer /v1/health within {timeout} s:\n{server.log()[-3000:]}")


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the test process dies, even by SIGKILL (Linux), so no server is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ---- the shared test server ---------------------------------------------------------------------

API_KEY = "test-key-0123456789"  # accepted by the shared server
OTHER_KEY = "other-key-9876543210"  # also accepted (a keys file with two keys and a comment)
LIMITS = {"max_candidates": 64, "max_examples": 200, "max_body_mb": 1.0}  # small, so tests can cross them cheaply

_shared: dict[str, ServerProcess] = {}


def shared_server() -> ServerProcess:
    """The session's test server: MiniLM, API keys, small limits, fault switch on. Started on first use.

    Loading the model costs seconds, so every test module shares this one process; it stops when
    the test process exits.
    """
    if "main" not in _shared:
        keys = tempfile.NamedTemporaryFile("w", prefix="bbt-keys-", suffix=".txt", delete=False)
        keys.write(f"# test keys\n{API_KEY}\n\n{OTHER_KEY}\n")
        keys.close()
        ctx = running_server(
            "--model", "minilm", "--api-keys", keys.name,
            "--max-candidates", str(LIMITS["max_candidates"]), "--max-examples", str(LIMITS["max_examples"]),
            "--max-body-mb", str(LIMITS["max_body_mb"]), env={"BBT_TEST_FAULTS": "1"},
        )
        _shared["main"] = ctx.__enter__()

        def stop() -> None:
            ctx.__exit__(None, None, None)
            os.unlink(keys.name)

        atexit.register(stop)
    return _shared["main"]
