"""The HTTP app (protocol v1) and `serve`, what `bbt serve` runs.

    create_app(service, api_keys=..., quotas=...)   the FastAPI app around a ModelService (tests build their own)
    serve(models=[...], port=8000, quota=...)       validate settings, load the models, run uvicorn

Routes live in `servers.routes`, API keys in `servers.auth`, quotas and rate limits in
`servers.quotas`, idempotent replays in `servers.idempotency`, error bodies and the body-size
guard in `servers.handlers`, the test-only fault switch in `servers.faults`. The OpenAPI page is /docs.
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

from bbt.version import __version__
from bbt.errors import ConfigError
from bbt.protocol import PROTOCOL_VERSION
from servers import auth, faults, routes
from servers.auth import key_digests, keys_from_env, load_api_keys, require_key
from servers.handlers import RequestGuard, install_error_handlers
from servers.idempotency import IdempotencyStore
from servers.quotas import Quotas
from servers.service import Limits, ModelService
from servers.state import ServerState

log = logging.getLogger("bbt.server")

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


def create_app(service: ModelService, *, api_keys: Iterable[str] | None = None, quotas: Quotas | None = None,
               idempotency: IdempotencyStore | None = None, test_faults: bool | None = None) -> FastAPI:
    """The FastAPI app serving `service`'s models.

    Args:
        service: the loaded models and the request limits (`service.limits`).
        api_keys: keys accepted as 'Authorization: Bearer KEY', each a key or 'sha256:HEX' (only
            digests are kept); None or empty: no key needed.
        quotas: per-key query quota and request rate; None: neither.
        idempotency: where answers to Idempotency-Key requests are kept; None: a default store.
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
    app.state.key_digests = key_digests(api_keys)
    app.state.quotas = quotas or Quotas()
    # one database for both, so that a charge and its stored answer commit together
    app.state.idempotency = idempotency or IdempotencyStore(state=app.state.quotas.state)
    app.state.faults = faults.FaultSwitch() if test_faults else None
    app.include_router(routes.public)
    app.include_router(routes.keyed)
    install_error_handlers(app)
    if test_faults:
        app.include_router(faults.router, dependencies=[Depends(require_key)])
        app.add_middleware(faults.FaultMiddleware, switch=app.state.faults)
    app.add_middleware(RequestGuard, max_bytes=service.limits.max_body_bytes)  # outermost: added last
    return app


def serve(models: list[str], *, host: str = "127.0.0.1", port: int = 8000, api_keys_file: str | Path | None = None,
          max_candidates: int = 256, max_examples: int = 10000, max_body_mb: float = 64.0,
          quota: int | None = None, quota_window: float = 86400.0, rate_limit: float | None = None,
          device: str = "auto", compile: bool = False, upstream: str | None = None, dtype: str = "float32",
          state: str | Path | None = None) -> None:
    """Validate the settings, load the models, then serve until interrupted (blocking).

    Every setting is checked before the (slow) model loading, and a bad one raises ConfigError
    that names it, so `bbt serve` fails fast with a clear message instead of a traceback.
    API keys come from `api_keys_file`, else from the BBT_SERVER_API_KEYS environment variable.
    `upstream`: a vLLM URL whose engine runs the layers (`servers.upstream`): each model is then
    NAME=PATH, vLLM's served name and where its tokenizer and input embeddings are (its key, if it
    has one, in BBT_UPSTREAM_API_KEY). `dtype`: float32, bfloat16 or auto (`servers/precision.py`);
    an upstream engine runs in the precision it was started with. `state`: the SQLite file where
    quota windows and idempotent answers are kept across restarts (`servers.state`); None: memory.
    """
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(message)s")
    for name in ("bbt.server", "servers"):  # INFO even where the CLI already set up WARNING for the client
        logging.getLogger(name).setLevel(logging.INFO)
    if not 0 <= port <= 65535:
        raise ConfigError(f"--port {port} is not a TCP port (0 to 65535; 0 picks a free one)")
    if not models and not upstream:
        raise ConfigError("no model to serve: pass --model smollm2, --model minilm or --model PATH")
    if upstream and dtype != "float32":
        raise ConfigError("--dtype sets the precision of the layers this server runs; with --upstream vLLM runs them "
                          "(start vLLM with --dtype bfloat16 instead)")
    try:
        limits = Limits(max_candidates=max_candidates, max_examples=max_examples,
                        max_body_bytes=int(max_body_mb * 2**20))
    except ValidationError as exc:
        err = exc.errors()[0]
        flag = {"max_body_bytes": "--max-body-mb"}.get(str(err["loc"][0]), "--" + str(err["loc"][0]).replace("_", "-"))
        raise ConfigError(f"{flag}: {err['msg']} (got {err.get('input')})") from None
    store = ServerState(state)  # a bad path fails here, before the models load
    quotas = Quotas(quota=quota, window=quota_window, rate=rate_limit, state=store)
    if state is not None:
        log.info("quotas and idempotent answers kept in %s (they survive a restart)", store.path)
    elif quota is not None:
        log.info("quotas and idempotent answers kept in memory: a restart forgets them (--state FILE keeps them)")
    env_keys = os.environ.get(auth.ENV_VAR)
    if api_keys_file:
        digests = load_api_keys(api_keys_file)
        if env_keys is not None:
            log.info("%s is ignored: --api-keys %s is given", auth.ENV_VAR, api_keys_file)
    else:
        digests = keys_from_env(env_keys) if env_keys is not None else frozenset()
    if digests:
        log.info("%d API key(s) from %s", len(digests), api_keys_file or auth.ENV_VAR)
    elif host not in _LOOPBACK:
        log.warning("listening on %s without --api-keys: anyone who can reach this port can spend its compute", host)
    if quotas.active:
        log.info("per key: %s queries per %g s window; %s requests a second", quotas.quota or "unlimited",
                 quotas.window, f"{quotas.rate:g}" if quotas.rate else "unlimited")
    if quotas.active and not digests:
        log.info("no API keys: every client shares one quota and rate limit (account %r)", auth.ANONYMOUS)

    start = time.perf_counter()
    if compile:
        log.info("compiling the models' layer blocks with torch.compile (up to a minute)")
    engine = None
    if upstream:
        from servers.upstream import VLLMEngine

        # a short wait: a client retrying this server's 503 decides how long the engine may take to come back;
        # at start-up the whole of it, as the engine may still be starting beside this server
        engine = VLLMEngine(upstream, api_key=os.environ.get("BBT_UPSTREAM_API_KEY"), wait=30.0, first_contact_wait=None)
        log.info("relaying to %s at %s", engine.name, engine.url)
        models = models or list(engine.cards)  # what vLLM serves, each name its own model files (smollm2)
    service = ModelService(models, limits=limits, lazy=False, device=device, compile=compile, upstream=engine,
                           dtype=dtype)
    log.info("loaded %s %s%s in %.1f s", ", ".join(service.names),
             f"in front of {engine.name}" if engine else
             f"on {service.device} in {', '.join(sorted({service.get(n).dtype for n in service.names}))}",
             ", compiled" if compile else "",
             time.perf_counter() - start)
    app = create_app(service, api_keys=[f"sha256:{d}" for d in digests], quotas=quotas,
                     idempotency=IdempotencyStore(state=store))
    # one worker process: the models live in this process; keep-alive so clients reuse connections
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_keep_alive=75)
