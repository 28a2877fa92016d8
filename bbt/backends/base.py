"""The Backend contract: how a query reaches a model. Four methods, all in protocol objects."""

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
