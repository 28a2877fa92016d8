"""A real `bbt serve` in a subprocess on a free loopback port, for tests and benchmarks.

    with running_server("--model", "minilm", env={"BBT_TEST_FAULTS": "1"}) as server:
        httpx.get(server.url + "/v1/health")

    server = shared_server()   # one keyed test server per test session, shared by the test modules

Starting and stopping the process is `servers.process` (what `bbt demo` uses too); here it runs
from the repository root, and `shared_server` adds the session-wide keyed server.
"""

from __future__ import annotations

import atexit
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from servers.process import START_TIMEOUT, ServerProcess, free_port
from servers.process import running_server as _running_server

REPO = Path(__file__).resolve().parents[1]

__all__ = ["API_KEY", "LIMITS", "OTHER_KEY", "REPO", "ServerProcess", "free_port", "running_server", "shared_server"]


@contextmanager
def running_server(*args: str, env: dict[str, str] | None = None, timeout: float = START_TIMEOUT, port: int | None = None):
    """`servers.process.running_server` run from the repository root (the checkout's bbt, installed or not)."""
    with _running_server(*args, env=env, timeout=timeout, cwd=REPO, port=port) as server:
        yield server


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
