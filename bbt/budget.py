"""Query budgeting: the limits a run may not cross, and the ledger of what it spent.

Units: a *query* is one candidate scored on one batch (the papers' "API call", the unit of the
budget); a *request* is one round trip carrying a whole population; *examples* = queries x batch
size; *tokens* are what the server bills (inputs with template, plus the prompt tokens); *cost* is
tokens / 1000 x price_per_1k_tokens.

Limits are checked before a request is sent (`Ledger.affordable`): a generation that would cross
any limit is cut to the candidates that fit, or not sent, so no limit is ever exceeded. What the
server reports spending is reconciled with the client's own count (`Ledger.record`).
"""

from __future__ import annotations

import math

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bbt.errors import ConfigError
from bbt.protocol import Usage

LIMITS = ("queries", "requests", "examples", "tokens", "cost")


class Budget(BaseModel):
    """Spending limits of a tuning run. None = no limit in that unit, but at least one unit is limited.

    A budget with no limit at all would let a run go on forever, so it is refused; so is a `cost`
    without a `price_per_1k_tokens` (nothing would ever be charged against it).
    """

    model_config = ConfigDict(extra="forbid")

    queries: int | None = Field(default=8000, ge=1, description="candidates scored (train and dev)")
    requests: int | None = Field(default=None, ge=1, description="round trips to the model")
    examples: int | None = Field(default=None, ge=1, description="queries x examples per query")
    tokens: int | None = Field(default=None, ge=1, description="tokens billed by the server")
    cost: float | None = Field(default=None, gt=0, description="money, in the unit of price_per_1k_tokens")
    price_per_1k_tokens: float = Field(default=0.0, ge=0, description="what 1000 billed tokens cost")

    @model_validator(mode="after")
    def _some_limit(self) -> Budget:
        if self.cost is not None and self.price_per_1k_tokens == 0:
            raise ValueError(f"cost={self.cost} needs a price_per_1k_tokens above 0: without a price nothing is "
                             "charged, so the cost limit would never stop the run")
        if not self.limits():
            raise ValueError("a budget needs at least one limit (queries, requests, examples, tokens, or cost with "
                             "a price_per_1k_tokens), else the run never ends; e.g. Budget(queries=8000)")
        return self

    def limits(self) -> dict[str, float]:
        """The units that really limit a run, with their limits (cost only where it has a price)."""
        found = {unit: getattr(self, unit) for unit in LIMITS if getattr(self, unit) is not None}
        if self.price_per_1k_tokens == 0:
            found.pop("cost", None)
        return found


class Spent(BaseModel):
    """Totals of one purpose (tuning or evaluation)."""

    queries: int = 0
    requests: int = 0
    examples: int = 0
    tokens: int = 0
    cost: float = 0.0


def _how_many(left: float, each: float) -> float:
    """How many items costing `each` fit in what is `left` of a limit (inf where they cost nothing)."""
    if left < 0:
        return 0
    if each <= 0:
        return math.inf
    if isinstance(left, int) and isinstance(each, int):
        return left // each
    # a hair of slack so that float rounding never turns "exactly fits" into "crosses"
    return math.floor(left / each + 1e-9)


class Ledger:
    """What a run spent, written down before the next request goes out.

    `tuning` counts against the budget; `evaluation` (zero-prompt baseline, test set) is reported
    beside it but not limited, since it is not part of the search.
    """

    def __init__(self, budget: Budget):
        if not budget.limits():  # only a budget changed after validation, or never validated, gets here
            raise ConfigError("the budget has no limit, so tuning would never stop: set queries, requests, "
                              "examples, tokens or cost (bbt tune --budget QUERIES)")
        self.budget = budget
        self.tuning = Spent()
        self.evaluation = Spent()
        self.mismatches: list[str] = []

    def affordable(self, queries: int, *, examples_per_query: int, tokens_per_query: int) -> int:
        """How many of `queries` candidates fit in every remaining limit (0: none; the run ends).

        A unit a query does not spend (0 examples or tokens per query, or a price of 0) cannot be
        what cuts the run; a limit already crossed (a server that billed more than the client
        counted) lets nothing more through.
        """
        for name, value in (("queries", queries), ("examples_per_query", examples_per_query),
                            ("tokens_per_query", tokens_per_query)):
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value}")
        b, s = self.budget, self.tuning
        fits = [queries]
        if b.queries is not None:
            fits.append(b.queries - s.queries)
        if b.requests is not None and s.requests >= b.requests:
            fits.append(0)
        if b.examples is not None:
            fits.append(_how_many(b.examples - s.examples, examples_per_query))
        if b.tokens is not None:
            fits.append(_how_many(b.tokens - s.tokens, tokens_per_query))
        if b.cost is not None and b.price_per_1k_tokens > 0:
            fits.append(_how_many(b.cost - s.cost, tokens_per_query / 1000 * b.price_per_1k_tokens))
        return max(0, min(fits))

    def record(self, usage: Usage, *, expected: Usage, tuning: bool = True) -> None:
        """Add a request's spending; the client's own count wins where the server disagrees.

        The client's count (`expected`) is what the budget was checked against; a server that
        reports more is noted in `mismatches` (and in the run's summary), never silently absorbed.
        """
        target = self.tuning if tuning else self.evaluation
        for unit in ("queries", "examples", "tokens"):
            got, want = getattr(usage, unit), getattr(expected, unit)
            if got != want:
                self.mismatches.append(f"server reported {got} {unit}, client counted {want}")
        charged = Usage(
            queries=max(usage.queries, expected.queries),
            requests=1,
            examples=max(usage.examples, expected.examples),
            tokens=max(usage.tokens, expected.tokens),
        )
        target.queries += charged.queries
        target.requests += charged.requests
        target.examples += charged.examples
        target.tokens += charged.tokens
        target.cost += charged.tokens / 1000 * self.budget.price_per_1k_tokens

    def summary(self) -> dict:
        """Spending as a plain dict for metrics.json and the end-of-run printout."""
        return {
            "budget": self.budget.model_dump(),
            "tuning": self.tuning.model_dump(),
            "evaluation": self.evaluation.model_dump(),
            "usage_mismatches": self.mismatches[:20],
        }

    def describe(self) -> str:
        t, e = self.tuning, self.evaluation
        b = self.budget
        money = f", cost {t.cost:.4f}" if b.price_per_1k_tokens else ""
        cap = f"/{b.queries}" if b.queries is not None else ""
        return (f"spent: {t.queries}{cap} queries, {t.requests} requests, {t.examples} examples, "
                f"{t.tokens} tokens{money} (evaluation: {e.queries} queries, {e.tokens} tokens)")
