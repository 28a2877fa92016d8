"""The Backend contract: how a query reaches a model. Four methods, all in protocol objects; and
PayerTagging, what a backend that keeps answers adds."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from bbt.protocol import EvaluateRequest, EvaluateResponse, ModelInfo, StatsRequest, StatsResponse


@runtime_checkable
class Backend(Protocol):
    """A model reachable for scoring: in this process (`LocalBackend`) or over HTTP (`HTTPBackend`)."""

    def model_info(self, model: str) -> ModelInfo:
        """Hidden size, layers, prompt limits and scales of a model (free)."""

    def stats(self, request: StatsRequest) -> StatsResponse:
        """Tokens per input and hidden-state scales on a task's inputs (billed as examples and tokens, no queries)."""

    def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        """Score a population of candidates: one request, K queries."""

    def close(self) -> None:
        """Release connections or models."""


@runtime_checkable
class PayerTagging(Protocol):
    """A Backend that keeps answers (`bbt.cache.CachedBackend`) and says who paid for one it answers
    from its store, so that a resumed run books its own earlier requests as paid, not as free hits."""

    def evaluate_tagged(self, request: EvaluateRequest, payer: str | None = None) -> tuple[EvaluateResponse, str | None]:
        """The answer, and None when it was paid for now (stored under `payer`), else the tag stored with it."""
