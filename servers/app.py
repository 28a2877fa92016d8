"""The HTTP app (protocol v1) and `serve`, what `bbt serve` runs.

    create_app(service, api_keys=...)   the FastAPI app around a ModelService (tests build their own)
    serve(models=[...], port=8000)      validate settings, load the models, run uvicorn

Routes live in `servers.routes`, API keys in `servers.auth`, error bodies and the body-size guard
in `servers.handlers`, the test-only fault switch in `servers.faults`. The OpenAPI page is /docs.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import Depends, FastAPI
from pydantic import ValidationError

from bbt import __version__
from bbt.errors import ConfigError
from bbt.protocol import PROTOCOL_VERSION
from servers import faults, routes
from servers.auth import load_api_keys, require_key
from servers.handlers import RequestGuard, install_error_handlers
from servers.service import Limits, ModelService

log = logging.getLogger("bbt.server")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(service: ModelService, *, api_keys: Iterable[str] | None = None, test_faults: bool | None = None) -> FastAPI:
    """The FastAPI app serving `service`'s models.

    Args:
        service: the loaded models and the request limits (`service.limits`).
        api_keys: keys accepted as 'Authorization: Bearer KEY'; None or empty: no key needed.
        test_faults: mount the test fault switch (/v1/_faults); None: only if BBT_TEST_FAULTS=1.
    """
    if test_faults is None:
        test_faults = os.environ.get(faults.ENV_VAR) == "1"

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # Compute each model's info (a forward pass on sample text) before the first request, so
        # that no request ever runs an unlocked forward pass beside an evaluate.
        for name in service.names:
            service.get(name).info()
        log.info("serving %s (protocol v%s)%s", ", ".join(service.names), PROTOCOL_VERSION,
                 "; TEST FAULT SWITCH ON" if test_faults else "")
        yield

    app = FastAPI(
        title="bbt model server",
        version=__version__,
        summary=f"Black-box tuning protocol v{PROTOCOL_VERSION}: score populations of soft prompts on frozen models.",
        lifespan=lifespan,
    )
    app.state.service = service
    app.state.api_keys = frozenset(api_keys or ())
    app.state.faults = faults.FaultSwitch() if test_faults else None
    app.include_router(routes.public)
    app.include_router(routes.keyed)
    if test_faults:
        app.include_router(faults.router, dependencies=[Depends(require_key)])
    install_error_handlers(app)
    app.add_middleware(RequestGuard, max_bytes=service.limits.max_body_bytes)
    return app


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_keys_file: str | Path | None = None,
          max_candidates: int = 256, max_examples: int = 10000, max_body_mb: float = 64.0) -> None:
    """Validate the settings, load the models, then serve until interrupted (blocking).

    Every setting is checked before the (slow) model loading, and a bad one raises ConfigError
    that names it, so `bbt serve` fails fast with a clear message instead of a traceback.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (0 to 65535; 0 picks a free one)")
    if not models:
        raise ConfigError("no model to serve: pass --model minilm or --model PATH")
    try:
        limits = Limits(max_candidates=max_candidates, max_examples=max_examples,
                        max_body_bytes=int(max_body_mb * 2**20))
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = {"max_body_bytes": "--max-body-mb"}.get(str(err["loc"][0]), "--" + str(err["loc"][0]).replace("_", "-"))
        raise ConfigError(f"{flag}: {err['msg']} (got {err.get('input')})") from None
    keys = load_api_keys(api_keys_file) if api_keys_file else None
    if keys is None and host not in _LOOPBACK:
        log.warning("listening on %s without --api-keys: anyone who can reach this port can spend its compute", host)

    start = time.perf_counter()
    service = ModelService(models, limits=limits, lazy=False)
    log.info("loaded %s in %.1f s", ", ".join(service.names), time.perf_counter() - start)
    app = create_app(service, api_keys=keys)
    # one worker process: the models live in this process; keep-alive so clients reuse connections
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=75)
