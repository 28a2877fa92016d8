"""One factory for every backend: the model in this process, a bbt server behind a URL, or an
engine bbt talks to directly (vLLM). The CLI, the Python API, sweeps and the demo all open theirs here.

    backend = open_backend()                                     # the model in this process
    backend = open_backend(["http://127.0.0.1:8001"])            # the engine recognised from its answers
    backend = open_backend(url, engine="vllm", model_files="/models/smollm2")
"""

from __future__ import annotations

import httpx

from bbt.backends.http import FIRST_CONTACT_WAIT, TIMEOUT, WAIT, HTTPBackend, base_url
from bbt.errors import ConfigError

ENGINES = ("auto", "bbt", "vllm")


def detect_engine(url: str, api_key: str | None = None, timeout: float = 10.0) -> str | None:
    """'bbt' or 'vllm' by what the server at `url` answers (two GETs, free); None when it does not
    answer or is neither, and the bbt client's own errors and retries take over."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    base = base_url(url)
    try:
        with httpx.Client(base_url=base, headers=headers, timeout=timeout) as client:
            health = client.get("/v1/health")
            if health.status_code == 200 and "protocol" in _json(health):
                return "bbt"
            version = client.get("/version")
            if version.status_code == 200 and "version" in _json(version):
                return "vllm"
    except httpx.TransportError:
        return None
    return None


def _json(resp: httpx.Response) -> dict:
    try:
        body = resp.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def open_endpoint(urls: list[str] | str, *, engine: str = "auto", model_files: str | None = None,
                  api_key: str | None = None, timeout: float = TIMEOUT, wait: float = WAIT, retries: int | None = None,
                  first_contact_wait: float | None = FIRST_CONTACT_WAIT):
    """The backend for `urls`: `HTTPBackend` for bbt servers, `VLLMBackend` for a vLLM server
    (`engine` 'auto' asks the first URL which it is). `first_contact_wait`: seconds of retries for a
    server that has not answered yet (None: `wait`, for one known to have answered before)."""
    urls = [urls] if isinstance(urls, str) else list(urls)
    if engine not in ENGINES:
        raise ConfigError(f"--engine {engine!r}: choose {', '.join(ENGINES)}")
    if engine == "auto" and urls:
        engine = detect_engine(urls[0], api_key) or "bbt"
    if engine == "vllm":
        from bbt.backends.vllm import VLLMBackend

        if len(urls) != 1:
            raise ConfigError("give one vLLM URL: vLLM spreads work over its own replicas (put a router in front)")
        return VLLMBackend(urls[0], model_files=model_files, api_key=api_key, timeout=max(timeout, 600.0), wait=wait,
                           retries=retries, first_contact_wait=first_contact_wait)
    if model_files:
        raise ConfigError("--model-files is for an engine bbt writes embeddings for (vLLM); a bbt server has its "
                          "own model files")
    return HTTPBackend(urls, api_key=api_key, timeout=timeout, wait=wait, retries=retries,
                       first_contact_wait=first_contact_wait)


def open_backend(endpoint: str | list[str] | None = None, *, models: list[str] | None = None, device: str | None = None,
                 dtype: str | None = None, engine: str = "auto", model_files: str | None = None,
                 api_key: str | None = None, timeout: float = TIMEOUT, wait: float = WAIT, retries: int | None = None,
                 first_contact_wait: float | None = FIRST_CONTACT_WAIT):
    """The backend for `endpoint` (one URL or several: see `open_endpoint`), or without one the
    model in this process (`LocalBackend`: `models` loaded at once, on `device`, in `dtype`;
    None: auto and float32). `device` and `dtype` name the in-process model: with an endpoint the
    server decides its own, so a `device` is refused (a `dtype` is checked against the server's
    by the caller, which knows the model)."""
    if endpoint:
        if device is not None:
            raise ConfigError("--device sets where a model in this process runs; with --endpoint the server decides "
                              "(start it with bbt serve --device DEV)")
        return open_endpoint(endpoint, engine=engine, model_files=model_files, api_key=api_key, timeout=timeout,
                             wait=wait, retries=retries, first_contact_wait=first_contact_wait)
    from bbt.backends.local import LocalBackend

    return LocalBackend(models, device=device or "auto", dtype=dtype or "float32")
