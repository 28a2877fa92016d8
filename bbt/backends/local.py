"""In-process backend: the model runs inside this Python process (needs the `server` extra)."""

from __future__ import annotations

from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, EvaluateResponse, ModelInfo, StatsRequest, StatsResponse


class LocalBackend:
    """Calls the server's evaluation code directly, with the same protocol objects as HTTP."""

    def __init__(self, models: list[str] | None = None, *, device: str = "auto", compile: bool = False,
                 dtype: str = "float32"):
        """`device`: where the models run: auto (a GPU if torch sees one, else the CPU), cpu,
        cuda, cuda:N or mps. `compile`: torch.compile the models' layer blocks when they load
        (up to a minute; slightly faster passes after). `dtype`: float32, bfloat16 (norms,
        softmax and read-out stay float32) or auto (bfloat16 where it pays on this hardware)."""
        try:
            from servers import service
        except ImportError as exc:
            raise ConfigError(
                f"running a model in process needs the model side ({exc.name} is missing): "
                "pip install 'bbt[server]', or tune against a server with --endpoint URL"
            ) from None
        self.service = service.ModelService(models or [], device=device, compile=compile, dtype=dtype)  # the model side, for benchmarks and tests

    def model_info(self, model: str) -> ModelInfo:
        return self.service.get(model).info()

    def stats(self, request: StatsRequest) -> StatsResponse:
        return self.service.stats(request)

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        return self.service.evaluate(request)

    def close(self) -> None:
        pass  # loaded models stay cached in the process for the next backend

    def __enter__(self) -> LocalBackend:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
