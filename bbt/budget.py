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

import json
import math
import os
import time
from pathlib import Path

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

    queries: int | None = Field(
        default=8000, ge=1,
        description="queries (candidates scored on train and dev); the papers' budget is 8000: SmolLM2 tunes about "
        "200 SST-2 queries in 3 minutes on 2 CPU cores, so that is about two hours there, more on longer inputs (try "
        "500 first; bbt tune --dry-run estimates the time)")
    requests: int | None = Field(default=None, ge=1, description="round trips to the model")
    examples: int | None = Field(default=None, ge=1, description="examples scored (queries x inputs per query)")
    tokens: int | None = Field(default=None, ge=1, description="tokens billed by the server")
    cost: float | None = Field(default=None, gt=0, description="money, in the unit of `price_per_1k_tokens`")
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


def _add(total: Spent, part: Spent) -> None:
    for unit in LIMITS:
        setattr(total, unit, getattr(total, unit) + getattr(part, unit))


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

    With a `path`, every request is also a line of a JSONL journal (RUN/ledger.jsonl), flushed and
    fsynced before `record` returns, so that a run killed at any moment keeps what it paid for.
    Each line carries the request's *step* (its place in the run's sequence of requests) and its
    *source*: "server" (billed) or "cache" (answered from the evaluation cache, billed nothing).
    The budget counts steps, not lines: a resumed run redoes the steps after its checkpoint, and a
    step done again replaces its earlier line in the totals (so `tuning` matches an uninterrupted
    run), while `paid` adds up every billed line ever written (nothing paid is forgotten).

    A `run_id` (a run folder's, kept in its config.json) tags the answers this run pays for in an
    evaluation cache (`payer`): a kill after the answer was cached but before its line was written
    leaves a cached answer carrying this run's tag for a step with no line, which the resumed run
    books as billed, not as a free hit.
    """

    def __init__(self, budget: Budget, path: str | Path | None = None, run_id: str | None = None):
        if not budget.limits():  # only a budget changed after validation, or never validated, gets here
            raise ConfigError("the budget has no limit, so tuning would never stop: set queries, requests, "
                              "examples, tokens or cost (bbt tune --budget QUERIES)")
        self.budget = budget
        self.tuning = Spent()
        self.evaluation = Spent()
        self.paid = Spent()  # billed by a server, tuning and evaluation together; cache hits excluded
        self.cache_hits = 0
        self.mismatches: list[str] = []
        self.step = 0  # the next request's place in the run
        self._steps: dict[int, tuple[bool, Spent]] = {}  # step -> (tuning?, what it counts against the budget)
        self.path = None if path is None else Path(path)
        self.run_id = run_id
        self._journal = None
        if self.path is not None:
            self._replay()
            self._journal = self.path.open("a", encoding="utf-8")

    def _replay(self) -> None:
        """Read an existing journal (a resumed run); a torn last line (a kill mid-write) is cut off."""
        if not self.path.exists():
            return
        raw = self.path.read_bytes()
        good = raw[: raw.rfind(b"\n") + 1]  # bytes after the last newline are a line never finished
        if len(good) != len(raw):
            self.path.write_bytes(good)
        for number, line in enumerate(good.decode("utf-8").splitlines(), 1):
            try:
                entry = json.loads(line)
                spent = Spent(**{unit: entry[unit] for unit in LIMITS})
                step, tuning, source = int(entry["step"]), entry["purpose"] == "tuning", entry["source"]
            except (ValueError, KeyError, TypeError) as exc:
                raise ConfigError(f"{self.path}, line {number}: not a ledger entry ({exc}); the file was edited "
                                  "or belongs to another version of bbt") from None
            self._steps[step] = (tuning, spent)
            if source == "server":
                _add(self.paid, spent)
            else:
                self.cache_hits += 1
            self.mismatches.extend(entry.get("mismatches", []))
        self.rewind(max(self._steps, default=-1) + 1)

    def rewind(self, step: int) -> None:
        """Count only steps before `step` against the budget: where a resumed run picks up.

        Lines of later steps stay in the journal (and in `paid`); when those steps are done again,
        their new lines replace them in the totals.
        """
        self.step = step
        self.tuning, self.evaluation = Spent(), Spent()
        for s, (tuning, spent) in self._steps.items():
            if s < step:
                _add(self.tuning if tuning else self.evaluation, spent)

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

    def payer(self) -> str | None:
        """The tag an evaluation cache stores with the answer to the next request (None: untagged)."""
        return None if self.run_id is None else f"{self.run_id}/{self.step}"

    def record(self, usage: Usage, *, expected: Usage, tuning: bool = True, cached: bool = False,
               paid_by: str | None = None) -> None:
        """Add a request's spending; the client's own count wins where the server disagrees.

        The client's count (`expected`) is what the budget was checked against; a server that
        reports more is noted in `mismatches` (and in the run's summary), never silently absorbed.
        A `cached` answer counts against the budget like any other (so a run decides the same
        way with or without a cache) but adds nothing to `paid`. `paid_by` is the payer tag a
        cached answer was stored with (`CachedBackend.evaluate_tagged`, as `bbt.session` passes it
        on; implies `cached`): this run's own tag for a step it never wrote down means the answer
        was billed to this run, and is booked so.
        """
        cached = cached or paid_by is not None
        if paid_by and paid_by == self.payer() and self.step not in self._steps:
            cached = False  # paid by this run before a kill, cached, never journaled
        notes = []
        if not cached:
            for unit in ("queries", "examples", "tokens"):
                got, want = getattr(usage, unit), getattr(expected, unit)
                if got != want:
                    notes.append(f"server reported {got} {unit}, client counted {want}")
        charged = Spent(
            queries=max(usage.queries, expected.queries),
            requests=1,
            examples=max(usage.examples, expected.examples),
            tokens=max(usage.tokens, expected.tokens),
        )
        charged.cost = charged.tokens / 1000 * self.budget.price_per_1k_tokens
        if self._journal is not None:
            entry = {"step": self.step, "purpose": "tuning" if tuning else "evaluation",
                     "source": "cache" if cached else "server", **charged.model_dump(), "time": round(time.time(), 3)}
            if notes:
                entry["mismatches"] = notes
            self._journal.write(json.dumps(entry) + "\n")
            self._journal.flush()
            os.fsync(self._journal.fileno())  # on disk before the next request can be sent
        self.mismatches.extend(notes)
        self._steps[self.step] = (tuning, charged)  # a step redone after a resume replaces its first line
        _add(self.tuning if tuning else self.evaluation, charged)
        if cached:
            self.cache_hits += 1
        else:
            _add(self.paid, charged)
        self.step += 1

    def close(self) -> None:
        if self._journal is not None:
            self._journal.close()
            self._journal = None

    def summary(self) -> dict:
        """Spending as a plain dict for metrics.json and the end-of-run printout."""
        return {
            "budget": self.budget.model_dump(),
            "tuning": self.tuning.model_dump(),
            "evaluation": self.evaluation.model_dump(),
            "paid": self.paid.model_dump(),  # billed by the server; cache hits and redone steps cost nothing here
            "cache_hits": self.cache_hits,
            "usage_mismatches": self.mismatches[:20],
        }

    def describe(self) -> str:
        t, e, b = self.tuning, self.evaluation, self.budget
        money = f", cost {t.cost:.4f}" if b.price_per_1k_tokens else ""
        cap = f"/{b.queries}" if b.queries is not None else ""
        paid = self.paid.queries
        saved = f"; paid for {paid} queries, {self.cache_hits} requests answered from the cache" if self.cache_hits else ""
        if paid != t.queries + e.queries and not self.cache_hits:
            saved = f"; paid for {paid} queries (a resumed run redid some)"
        return (f"spent: {t.queries}{cap} queries, {t.requests} requests, {t.examples} examples, "
                f"{t.tokens} tokens{money} (evaluation: {e.queries} queries, {e.tokens} tokens){saved}")
