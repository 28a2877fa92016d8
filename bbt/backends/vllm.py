"""vLLM backend: tune against a vLLM server through its prompt embeddings, from this process.

    backend = VLLMBackend("http://127.0.0.1:8001", model_files="/models/smollm2")

vLLM takes a soft prompt only as input embeddings, so the inputs are written as embeddings here:
this needs the served model's tokenizer and input-embedding table (a local folder, or a model bbt
knows such as `smollm2`) and the model side of bbt (`pip install 'bbt[server]'`: torch). The
scoring itself, the check that the engine serves the same model, and what it cannot do (deep
prompts) are in `servers.upstream`, which `bbt serve --upstream` shares: a client without torch
tunes through such a server with `HTTPBackend` instead.
"""

from __future__ import annotations

from bbt.backends.http import FIRST_CONTACT_WAIT
from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, EvaluateResponse, ModelInfo, StatsRequest, StatsResponse


class VLLMBackend:
    """A Backend whose model runs on a vLLM server started with --enable-prompt-embeds.

    Args:
        url: the server's base URL.
        model_files: where the served model's tokenizer and input embeddings are (a folder, a
            .gguf file or a name bbt knows); None: the model's name is looked up as such (smollm2).
        api_key: vLLM's --api-key, if it has one.
        timeout, wait, retries, first_contact_wait: as `HTTPBackend`.
        engine_options: `servers.upstream.VLLMEngine`'s request shape (rows_per_request, in_flight).
    """

    def __init__(self, url: str, *, model_files: str | None = None, api_key: str | None = None,
                 timeout: float = 600.0, wait: float = 300.0, retries: int | None = None,
                 first_contact_wait: float | None = FIRST_CONTACT_WAIT, **engine_options):
        try:
            from servers.service import ModelService
            from servers.upstream import VLLMEngine
        except ImportError as exc:
            raise ConfigError(
                f"tuning directly against vLLM writes the inputs as embeddings, which needs the model side ({exc.name} "
                "is missing): pip install 'bbt[server]'; or run bbt serve --upstream URL next to the engine and point "
                "--endpoint at it"
            ) from None
        self.engine = VLLMEngine(url, api_key=api_key, timeout=timeout, wait=wait, retries=retries,
                                 first_contact_wait=first_contact_wait, **engine_options)
        self.model_files = model_files
        # private: runs.local_service takes a backend with `service` for one holding the weights
        self._service = ModelService([], upstream=self.engine)

    def __repr__(self) -> str:
        return f"VLLMBackend({self.engine.url!r}, {self.engine.name})"

    def _model(self, name: str):
        if name not in self._service.names:
            self._service.add(f"{name}={self.model_files or name}")
        return self._service.get(name)

    def model_info(self, model: str) -> ModelInfo:
        return self._model(model).info()

    def stats(self, request: StatsRequest) -> StatsResponse:
        self._model(request.model)
        return self._service.stats(request)

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        self._model(request.model)
        return self._service.evaluate(request)

    def close(self) -> None:
        self.engine.close()

    def __enter__(self) -> VLLMBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
