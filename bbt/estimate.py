"""What a tuning run would spend, worked out before it starts (`bbt tune --dry-run`).

    est = estimate(backend, cfg, task, data)   # sends stats requests only, never an evaluate query
    print(est.describe())

Units are those of `bbt.budget`: queries (candidates scored), requests (round trips), examples
(queries x examples per query), tokens (what the server bills: inputs with template, plus
prompt_length per example when a prompt is sent) and cost (tokens / 1000 x price_per_1k_tokens).

Tuning is what `bbt.tuner.tune` books against the budget: one request of `popsize` train queries
per generation, plus one dev query whenever a generation finds a new best on train. How often it
does depends on the losses, so the estimate replays the tuner's accounting loop on a `Ledger`
with the run's `Budget` (the same `Ledger.affordable` decides what fits, so every limit ends the
replay where it ends the run) for the two extremes: a new best in *every* generation (the most dev
queries and requests) and in the first generation only (the first always beats "no best yet").
Each unit's upper bound is the larger of the two, its lower bound the smaller.
Time: a model in this process is timed on requests of 1 and 3 random prompts of the run's length
on the train split (no query is billed); a line through the two gives seconds per request and per
token billed, and the run's requests and tokens at those rates give its time. A model behind an
endpoint is not timed, since timing it would cost queries.
With `--verbalizer auto` the words are chosen first, inside the budget: plain-model queries on
train (and one on dev unless K is given) as `bbt.verbalizers.choose` sends them; the dev one only
in the upper bound, since a choice with one option left skips it.
Evaluation is what `bbt.runs.run_tune` spends outside the budget: the plain model (no prompt), the
untuned prompt (z = 0) and the tuned prompt on the test split, and the plain model on dev (where
the folder has a test set), in chunks of EVAL_CHUNK examples, one query each; it is exact, but for `--verbalizer auto`'s pass of the plain model through the
chosen words, counted though it is skipped when they are the task's own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from bbt import verbalizers
from bbt.backends.base import Backend
from bbt.budget import LIMITS, Budget, Ledger, Spent
from bbt.config import TuneConfig, check_mode, with_family_defaults
from bbt.data import Split, TaskData
from bbt.errors import ConfigError
from bbt.tasks import for_family
from bbt.projection import uniform_spec
from bbt.protocol import EvaluateRequest, IntrinsicPrompts, ModelInfo, StatsRequest, TaskSpec, Tensor, Usage
from bbt.runs import local_service
from bbt.scoring import EVAL_CHUNK

_FLAGS = {"queries": "--budget", "requests": "--max-requests", "examples": "--max-examples",
          "tokens": "--max-tokens", "cost": "--max-cost"}
_LEAP_AFTER = 2000  # generations replayed one by one before whole identical ones are added in bulk
ROUNDS = "rounds"  # in Estimate.ends_by: the run ends after --rounds rounds, not at a limit


@dataclass
class Estimate:
    """Spending of a planned run: tuning (against the budget) and evaluation (outside it)."""

    budget: Budget
    popsize: int
    train_examples: int  # examples per train query
    dev_examples: int  # examples per dev query
    test_examples: int
    test_name: str
    train_tokens_per_query: int  # tokens billed for one candidate on the train split, prompt included
    dev_tokens_per_query: int
    tuning: Spent  # upper bound, per unit
    tuning_min: Spent  # lower bound, per unit
    generations: tuple[int, int]  # (least, most): a new best every generation leaves room for fewer
    dev_queries: tuple[int, int]  # (least, most)
    evaluation: Spent  # no prompt, zero prompt and tuned prompt on the test split, exact (auto words: at most)
    plain_dev_examples: int = 0  # the plain model on dev, in `evaluation` (0: dev is the test split)
    choice_queries: tuple[int, int] = (0, 0)  # (least, most) spent choosing words (--verbalizer auto)
    notes: list[str] = field(default_factory=list)  # what the replay leaves out
    ends_by: list[str] = field(default_factory=list)  # the limits that end the run, or ROUNDS
    rounds: int | None = None
    patience: int | None = None
    stats_requests: int = 0  # what the estimate itself sent (no queries; a server may bill their tokens)
    speed: Speed | None = None  # measured on the model in this process; None: not timed (an endpoint)

    def describe(self) -> str:
        """A few lines for the terminal."""
        b, money = self.budget, self.budget.price_per_1k_tokens > 0
        lines = [
            f"dry run: nothing was tuned and no evaluate query was sent ({self.stats_requests} stats requests "
            "counted the tokens)",
            f"per query: train {self.train_examples} examples, {self.train_tokens_per_query:,} tokens; "
            f"dev {self.dev_examples} examples, {self.dev_tokens_per_query:,} tokens (prompt tokens included)",
            "budget: " + ", ".join(f"{_fmt(limit)} {unit}" for unit, limit in b.limits().items())
            + (f"; price {b.price_per_1k_tokens:g} per 1k tokens" if money else ""),
        ]
        if self.generations[1] == 0:
            lines.append("tuning: the budget does not afford one train query: the run would go straight to evaluation")
        else:
            (g_lo, g_hi), (d_lo, d_hi) = self.generations, self.dev_queries
            c_lo, c_hi = self.choice_queries
            lines += [
                f"tuning, counted against the budget: {_range(g_lo, g_hi)} generations of up to {self.popsize} train "
                f"queries, plus one dev query per new best on train ({_range(d_lo, d_hi)})"
                + (f", after {_range(c_lo, c_hi)} queries of the plain model choosing the words (--verbalizer auto)"
                   if c_hi else ""),
                f"  upper bound (a new best in every generation): {_spent(self.tuning, money)}",
                f"  lower bound (a new best in the first only):   {_spent(self.tuning_min, money)}",
            ]
            limits = [u for u in self.ends_by if u != ROUNDS]
            if limits:
                lines.append("  the run ends when " + " and ".join(f"the {u} limit ({_fmt(getattr(b, u))}, {_FLAGS[u]})"
                                                                   for u in limits) + " is reached")
            if ROUNDS in self.ends_by:
                lines.append(f"  the run ends after {self.rounds} round{'s' * (self.rounds != 1)} (--rounds)"
                             f"{' at the latest' if limits else ''}")
            if self.patience is not None:
                lines.append(f"  it may end sooner (--patience {self.patience}): after as few as {self.patience + 1} "
                             "generations if dev never improves after the first")
        lines += [
            f"evaluation, outside the budget (no prompt, zero prompt and tuned prompt on {self.test_examples} {self.test_name} "
            f"examples" + (f", no prompt on {self.plain_dev_examples} dev examples" if self.plain_dev_examples else "")
            + f", in chunks of up to {EVAL_CHUNK}; "
            + ("and the plain model through the chosen words, unless they are the task's own; at most):"
               if self.choice_queries[1] else "exact):"),
            f"  {_spent(self.evaluation, money)}",
        ]
        lines.append(f"whole run, upper bound: {_spent(_add(self.tuning, self.evaluation), money)}")
        lines.append(self.describe_time())
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)

    def describe_time(self) -> str:
        """How long the run takes, roughly: its tokens at the measured seconds per token."""
        if self.speed is None:
            return ("time: not estimated for a model behind an endpoint (timing it would cost queries); the progress "
                    "bar and bbt watch show its queries per second once the run goes")
        lo, hi = self.speed.seconds(self.tuning_min), self.speed.seconds(self.tuning)
        scoring = self.speed.seconds(self.evaluation)
        return (f"time, roughly: {_span(lo + scoring, hi + scoring)}: tuning {_span(lo, hi)}, scoring the "
                f"{self.test_examples} {self.test_name} examples {_duration(scoring)} (the model in this process, timed "
                f"here on 3 unbilled requests on the train split: {self.speed.per_request:.2g} s per request and "
                f"{self.speed.per_token * 1000:.2g} ms per token)")


@dataclass(frozen=True)
class Speed:
    """How fast the model in this process scores: seconds per request plus seconds per token billed."""

    per_request: float
    per_token: float

    def seconds(self, spent: Spent) -> float:
        return spent.requests * self.per_request + spent.tokens * self.per_token


@dataclass(frozen=True)
class _PerQuery:
    examples: int
    tokens: int

    def affordable(self, ledger: Ledger, k: int) -> int:
        return ledger.affordable(k, examples_per_query=self.examples, tokens_per_query=self.tokens)

    def book(self, ledger: Ledger, k: int, *, tuning: bool = True) -> None:
        usage = Usage(queries=k, requests=1, examples=k * self.examples, tokens=k * self.tokens)
        ledger.record(usage, expected=usage, tuning=tuning)


def estimate(backend: Backend, cfg: TuneConfig, task: TaskSpec, data: TaskData) -> Estimate:
    """Replay the run's accounting without scoring anything (stats and model-info requests only)."""
    if not cfg.budget.limits():  # a validated Budget refuses this; one built unchecked still gets a clear answer
        raise ConfigError("the budget sets no limit, so the search would never end and bbt tune refuses to start it: "
                          "set --budget QUERIES (or --max-requests, --max-examples, --max-tokens, or --max-cost "
                          "with --price-per-1k-tokens)")
    info = backend.model_info(cfg.model)
    task, cfg = for_family(task, info.family), with_family_defaults(cfg, info.family, info.modes)  # as run_tune will run it
    check_mode(cfg, info)
    if cfg.prompt_length > info.max_prompt_tokens:  # the tuner refuses this too, before its first query
        raise ConfigError(f"prompt length {cfg.prompt_length} is over model {cfg.model!r}'s limit of {info.max_prompt_tokens} tokens")
    test = data.test if data.test is not None else data.dev
    stats_requests = 0

    def tokens(split: Split) -> list[int]:  # tokens per input with the template, prompt excluded
        nonlocal stats_requests
        counts = []
        for start in range(0, len(split), EVAL_CHUNK):
            counts += backend.stats(StatsRequest(model=cfg.model, task=task, inputs=split.examples[start : start + EVAL_CHUNK])).tokens
            stats_requests += 1
        return counts

    L = cfg.prompt_length
    plain_train = _PerQuery(len(data.train), sum(tokens(data.train)))  # the plain model: no prompt tokens
    dev_tokens = tokens(data.dev)
    plain_dev = _PerQuery(len(data.dev), sum(dev_tokens))
    train = _PerQuery(plain_train.examples, plain_train.tokens + plain_train.examples * L)  # as tuner.Scorer counts
    dev = _PerQuery(plain_dev.examples, plain_dev.tokens + plain_dev.examples * L)
    # --verbalizer auto: bbt.verbalizers.choose's plain-model queries, in order, each sent only if affordable
    auto = cfg.verbalizer == "auto" and cfg.method in ("bbt", "bbtv2")
    planned = verbalizers.queries(info.family, cfg.label_words) if auto else []
    sizes = {"train": plain_train, "dev": plain_dev}

    # as run.run_tune books it: one query per chunk for the plain model (no prompt), with auto words
    # once more through them, then the untuned prompt (z = 0) and the tuned one, L prompt tokens
    # each; no limit applies
    evaluation = Ledger(Budget(queries=1, price_per_1k_tokens=cfg.budget.price_per_1k_tokens))
    test_tokens = tokens(test)
    for prompt_tokens in (0, 0, L, L) if auto else (0, L, L):
        for start in range(0, len(test), EVAL_CHUNK):
            chunk = test_tokens[start : start + EVAL_CHUNK]
            _PerQuery(len(chunk), sum(chunk) + len(chunk) * prompt_tokens).book(evaluation, 1, tuning=False)
    plain_dev_examples = 0 if test is data.dev else len(data.dev)  # then the plain model on dev
    for start in range(0, plain_dev_examples, EVAL_CHUNK):
        chunk = dev_tokens[start : start + EVAL_CHUNK]
        _PerQuery(len(chunk), sum(chunk)).book(evaluation, 1, tuning=False)

    layers = 1 if cfg.method == "bbt" else info.num_layers
    most = None if cfg.rounds is None else cfg.rounds * layers  # generations
    every = _replay(cfg.budget, cfg.popsize, train, dev, every_generation_improves=True, most=most,
                    before=[sizes[s] for s in planned])
    first = _replay(cfg.budget, cfg.popsize, train, dev, every_generation_improves=False, most=most,
                    before=[sizes[s] for s in planned if s != "dev"])  # the dev probe may be skipped
    pair = (every.ledger.tuning, first.ledger.tuning)
    speed = measure_speed(backend, cfg, info, task, data.train)
    return Estimate(
        budget=cfg.budget, popsize=cfg.popsize, train_examples=train.examples, dev_examples=dev.examples,
        test_examples=len(test), test_name=data.test_name, train_tokens_per_query=train.tokens,
        dev_tokens_per_query=dev.tokens,
        tuning=Spent(**{u: max(getattr(x, u) for x in pair) for u in LIMITS}),
        tuning_min=Spent(**{u: min(getattr(x, u) for x in pair) for u in LIMITS}),
        generations=(every.generations, first.generations), dev_queries=(first.dev_queries, every.dev_queries),
        evaluation=evaluation.evaluation, plain_dev_examples=plain_dev_examples, ends_by=every.ends_by + [u for u in first.ends_by if u not in every.ends_by],
        stats_requests=stats_requests, rounds=cfg.rounds, patience=cfg.patience,
        choice_queries=(first.choice_queries, every.choice_queries), notes=_unreplayed(cfg),
        speed=speed,
    )


def measure_speed(backend: Backend, cfg: TuneConfig, info: ModelInfo, task: TaskSpec, split: Split) -> Speed | None:
    """The speed of the model in this process, from requests of 1 prompt (the faster of two: the
    first also pays one-time costs) and of 3 prompts of cfg.prompt_length on `split`, each a random
    input prompt; None for a model behind an endpoint, which would bill them."""
    if local_service(backend) is None:
        return None
    spec = uniform_spec(seed=0, d=cfg.intrinsic_dim, D=cfg.prompt_length * info.hidden_size)
    rng = np.random.default_rng(0)

    def timed(k: int) -> tuple[float, int]:
        z = Tensor.from_numpy(rng.standard_normal((k, 1, cfg.intrinsic_dim)))  # (K, layers, d)
        request = EvaluateRequest(model=cfg.model, task=task, inputs=split.examples, labels=split.labels,
                                  candidates=IntrinsicPrompts(z=z, projections=[spec], prompt_length=cfg.prompt_length))
        start = time.perf_counter()
        tokens = backend.evaluate(request).usage.tokens
        return time.perf_counter() - start, max(1, tokens)

    (t1, n1), (t3, n3), (again, _) = timed(1), timed(3), timed(1)
    t1 = min(t1, again)
    per_token = (t3 - t1) / (n3 - n1)
    if per_token <= 0:  # timing noise: all of it taken as cost per token
        return Speed(per_request=0.0, per_token=t3 / n3)
    return Speed(per_request=max(0.0, t1 - n1 * per_token), per_token=per_token)


def _unreplayed(cfg: TuneConfig) -> list[str]:
    """What the replay does not model, for the reader of the bounds."""
    notes = []
    if cfg.local != "none":
        notes.append(f"--local {cfg.local} sends its candidates one per request: the last {cfg.local_share:.0%} of "
                     "the queries take more requests than the replay of CMA-ES counts")
    if cfg.folds == 2:
        notes.append("--folds 2 searches on dev in its second half: tokens and examples per query follow dev's there, "
                     "which the replay, on train throughout, does not")
    return notes


@dataclass
class _Replay:
    ledger: Ledger
    generations: int = 0
    dev_queries: int = 0
    choice_queries: int = 0
    ends_by: list[str] = field(default_factory=list)


def _replay(budget: Budget, popsize: int, train: _PerQuery, dev: _PerQuery, *, every_generation_improves: bool,
            most: int | None = None, before: list[_PerQuery] = ()) -> _Replay:
    """The accounting of `bbt.tuner.tune`, step for step, with the train losses left out; `most`
    generations at the most (--rounds). `before`: single queries sent first, in order, each while
    the budget affords it (the word choice of --verbalizer auto)."""
    r = _Replay(Ledger(budget))
    for q in before:
        if not q.affordable(r.ledger, 1):
            break
        q.book(r.ledger, 1)
        r.choice_queries += 1

    def improves(generation: int) -> bool:
        return every_generation_improves or generation == 0

    while True:
        if r.generations == most:
            r.ends_by = [ROUNDS]
            break
        k = train.affordable(r.ledger, popsize)
        if k < popsize:
            r.ends_by = _ends_by(r.ledger, popsize, train)
        if k == 0:
            break
        train.book(r.ledger, k)
        if improves(r.generations) and dev.affordable(r.ledger, 1):
            dev.book(r.ledger, 1)
            r.dev_queries += 1
        r.generations += 1
        if k < popsize:
            break
        if r.generations == _LEAP_AFTER:
            _leap(r, popsize, train, dev if every_generation_improves else None, most)
    return r


def _leap(r: _Replay, popsize: int, train: _PerQuery, dev: _PerQuery | None, most: int | None) -> None:
    """Add in bulk the whole generations that would still go out identically (full, plus their dev query).

    Only very long runs get here (thousands of generations): it keeps the replay fast. Each limit
    is checked with Ledger.affordable as in the step-by-step replay; the summed cost may differ from
    the run's in the last float digits.
    """
    one = Ledger(r.ledger.budget)
    train.book(one, popsize)
    if dev is not None:
        dev.book(one, 1)

    def still_whole(m: int) -> bool:  # does generation m+1 after now go out like the others?
        probe = Ledger(r.ledger.budget)
        probe.tuning = _add(r.ledger.tuning, one.tuning, m)
        if train.affordable(probe, popsize) < popsize:
            return False
        train.book(probe, popsize)
        return dev is None or dev.affordable(probe, 1) == 1

    lo, hi = 0, 1  # galloping, then bisection: still_whole(lo) holds, still_whole(hi) does not
    while still_whole(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if still_whole(mid) else (lo, mid)
    if most is not None:
        lo = min(lo, most - r.generations)
    r.ledger.tuning = _add(r.ledger.tuning, one.tuning, lo)
    r.generations += lo
    r.dev_queries += lo if dev is not None else 0


def _ends_by(ledger: Ledger, popsize: int, train: _PerQuery) -> list[str]:
    """The limits that cut the next generation short: each alone affords as few queries as all together."""
    k = train.affordable(ledger, popsize)
    found = []
    for unit in ledger.budget.limits():
        alone = Ledger(Budget(**{"queries": None, unit: getattr(ledger.budget, unit)},
                              price_per_1k_tokens=ledger.budget.price_per_1k_tokens))
        alone.tuning = ledger.tuning
        if train.affordable(alone, popsize) == k:
            found.append(unit)
    return found


def _add(a: Spent, b: Spent, times: int = 1) -> Spent:
    return Spent(**{u: getattr(a, u) + times * getattr(b, u) for u in LIMITS})


def _fmt(x) -> str:
    return f"{x:,}" if isinstance(x, int) else f"{x:g}"


def _range(lo: int, hi: int) -> str:
    return f"{lo:,}" if lo == hi else f"{lo:,} to {hi:,}"


def _duration(seconds: float) -> str:
    """"40 s", "12 min", "2 h 5 min": a rough time, rounded to its leading unit."""
    if seconds < 1:
        return "under a second"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    hours, minutes = divmod(round(seconds / 60), 60)
    return f"{hours} h {minutes} min" if minutes else f"{hours} h"


def _span(lo: float, hi: float) -> str:
    a, b = _duration(lo), _duration(hi)
    return a if a == b else f"{a} to {b}"


def _spent(s: Spent, money: bool) -> str:
    return (f"{s.queries:,} queries, {s.requests:,} requests, {s.examples:,} examples, {s.tokens:,} tokens"
            + (f", cost {s.cost:.4f}" if money else ""))
