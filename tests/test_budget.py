"""The budget and its ledger: limits are never crossed, on paper and in a real tuning run."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.protocol import Usage


@pytest.mark.parametrize("field,value", [("queries", 0), ("requests", 0), ("examples", -5), ("tokens", 0),
                                         ("cost", 0.0), ("price_per_1k_tokens", -1.0), ("queries_max", 3)])
def test_budget_rejects_bad_values(field, value):
    with pytest.raises(ValidationError, match=field):
        Budget(**{field: value})


LIMITS = ("queries", "requests", "examples", "tokens", "cost")


def _within(ledger: Ledger) -> list[str]:
    """The limits the ledger's tuning spending has crossed."""
    b, s = ledger.budget, ledger.tuning
    crossed = [u for u in ("queries", "requests", "examples", "tokens")
               if getattr(b, u) is not None and getattr(s, u) > getattr(b, u)]
    if b.cost is not None and s.cost > b.cost * (1 + 1e-12):
        crossed.append("cost")
    return crossed


def _spend(ledger: Ledger, k: int, examples_per_query: int, tokens_per_query: int) -> None:
    usage = Usage(queries=k, requests=1, examples=k * examples_per_query, tokens=k * tokens_per_query)
    ledger.record(usage, expected=usage)


def test_affordable_never_crosses_and_is_tight():
    """Random budgets, spending histories and query sizes: what `affordable` allows fits every limit,
    and one candidate more (or one request more) would cross one."""
    rng = np.random.default_rng(0)
    checked_cut = 0
    for case in range(600):
        price = float(rng.choice([0.0, 0.01, 0.37, 2.5]))
        limits = dict(
            queries=int(rng.integers(1, 300)) if rng.random() < 0.7 else None,
            requests=int(rng.integers(1, 30)) if rng.random() < 0.5 else None,
            examples=int(rng.integers(1, 5000)) if rng.random() < 0.5 else None,
            tokens=int(rng.integers(1, 100_000)) if rng.random() < 0.5 else None,
            cost=float(rng.uniform(0.01, 5)) if price > 0 and rng.random() < 0.5 else None,
        )
        if all(v is None for v in limits.values()):
            limits["queries"] = int(rng.integers(1, 300))  # a budget with no limit is refused
        budget = Budget(**limits, price_per_1k_tokens=price)
        ledger = Ledger(budget)
        epq, tpq = int(rng.integers(1, 64)), int(rng.integers(1, 2000))
        popsize = int(rng.integers(2, 40))
        for _ in range(200):
            k = ledger.affordable(popsize, examples_per_query=epq, tokens_per_query=tpq)
            assert 0 <= k <= popsize
            if k < popsize:
                trial = Ledger(budget)
                trial.tuning = ledger.tuning.model_copy()
                if k > 0:
                    _spend(trial, k + 1, epq, tpq)  # one more candidate in the same request
                else:
                    _spend(trial, 1, epq, tpq)
                assert _within(trial), f"case {case}: affordable said {k} but {k + 1} fits {budget}"
                checked_cut += 1
            if k == 0:
                break
            _spend(ledger, k, epq, tpq)
            assert not _within(ledger), f"case {case}: crossed {_within(ledger)} with {ledger.tuning} under {budget}"
        else:
            assert budget.queries is None or ledger.tuning.queries <= budget.queries
    assert checked_cut > 300  # the tight branch was really exercised


def test_affordable_exact_fits_are_allowed():
    # 0.7 / 0.001 is 699.9999999999999 in floating point: 700 queries must still fit, and do not cross
    ledger = Ledger(Budget(queries=None, cost=0.7, price_per_1k_tokens=1.0))
    assert 0.7 / (1 / 1000 * 1.0) < 700
    assert ledger.affordable(1000, examples_per_query=1, tokens_per_query=1) == 700
    _spend(ledger, 700, 1, 1)
    assert not _within(ledger)
    assert ledger.affordable(1000, examples_per_query=1, tokens_per_query=1) == 0
    ledger = Ledger(Budget(queries=None, examples=64, tokens=640))
    assert ledger.affordable(10, examples_per_query=8, tokens_per_query=80) == 8
    assert Ledger(Budget(queries=5)).affordable(20, examples_per_query=1, tokens_per_query=1) == 5
    assert Ledger(Budget(queries=None, requests=1)).affordable(20, examples_per_query=1, tokens_per_query=1) == 20


def test_requests_limit_counts_round_trips():
    ledger = Ledger(Budget(queries=None, requests=2))
    assert ledger.affordable(50, examples_per_query=1, tokens_per_query=1) == 50
    _spend(ledger, 50, 1, 1)
    _spend(ledger, 1, 1, 1)
    assert ledger.affordable(50, examples_per_query=1, tokens_per_query=1) == 0


def test_a_budget_without_any_limit_is_refused():
    """No limit at all would let a run go on forever; a cost without a price never binds either."""
    with pytest.raises(ValidationError, match="at least one limit"):
        Budget(queries=None)
    with pytest.raises(ValidationError, match="cost=0.5 needs a price_per_1k_tokens"):
        Budget(cost=0.5)  # even with a query limit: the cost limit would silently do nothing
    with pytest.raises(ValidationError, match="at least one limit"):
        TuneConfig.model_validate({"budget": {"queries": None}})  # a hand-edited config.json
    assert Budget().limits() == {"queries": 8000}
    assert Budget(queries=None, cost=0.5, price_per_1k_tokens=0.1).limits() == {"cost": 0.5}


def test_a_ledger_refuses_a_budget_that_skipped_validation():
    unlimited = Budget.model_construct(queries=None, requests=None, examples=None, tokens=None, cost=None,
                                       price_per_1k_tokens=0.0)
    with pytest.raises(ConfigError, match="no limit, so tuning would never stop"):
        Ledger(unlimited)
    changed = Budget(queries=10)
    changed.queries = None  # assignment is not validated
    with pytest.raises(ConfigError, match="no limit"):
        Ledger(changed)


def test_affordable_when_a_query_costs_nothing_in_a_unit():
    """0 tokens or examples per query (or a price that makes a query free) cannot divide by zero:
    that unit just does not limit the run."""
    ledger = Ledger(Budget(queries=7, examples=5, tokens=5, cost=0.01, price_per_1k_tokens=1.0))
    assert ledger.affordable(20, examples_per_query=0, tokens_per_query=0) == 7
    ledger = Ledger(Budget(queries=None, tokens=100, cost=1.0, price_per_1k_tokens=2.0))
    assert ledger.affordable(20, examples_per_query=3, tokens_per_query=0) == 20
    assert ledger.affordable(20, examples_per_query=3, tokens_per_query=10) == 10
    assert Ledger(Budget(queries=None, examples=10)).affordable(4, examples_per_query=0, tokens_per_query=0) == 4
    assert Ledger(Budget(queries=3)).affordable(0, examples_per_query=1, tokens_per_query=1) == 0


def test_affordable_after_a_server_overbilled_is_zero():
    ledger = Ledger(Budget(queries=None, tokens=100, cost=1.0, price_per_1k_tokens=1.0))
    ledger.record(Usage(queries=1, requests=1, examples=1, tokens=150), expected=Usage(queries=1, requests=1, examples=1, tokens=90))
    assert ledger.tuning.tokens == 150  # the larger count is charged, and now the limit is crossed
    assert ledger.affordable(5, examples_per_query=1, tokens_per_query=0) == 0
    assert ledger.affordable(5, examples_per_query=1, tokens_per_query=10) == 0


@pytest.mark.parametrize("kwargs", [dict(queries=-1), dict(examples_per_query=-1), dict(tokens_per_query=-2)])
def test_affordable_rejects_negative_sizes(kwargs):
    args = dict(queries=4, examples_per_query=1, tokens_per_query=1) | kwargs
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be >= 0"):
        Ledger(Budget()).affordable(args.pop("queries"), **args)


@pytest.mark.parametrize("flags,message", [
    (["--budget", "none"], "--budget none needs another limit"),
    (["--max-cost", "2"], "--max-cost needs --price-per-1k-tokens"),
    (["--budget", "0"], "--budget 0"),
])
def test_cli_refuses_a_budget_without_a_limit(tmp_path, capsys, flags, message):
    from bbt.cli import build_parser, main

    assert main(["tune", "--data", str(tmp_path), "--out", str(tmp_path / "run"), *flags]) == 1
    assert message in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
    args = build_parser().parse_args(["tune", "--data", "D", "--out", "O"])
    assert args.budget == TuneConfig().budget.queries == 8000  # no --budget: the default limit
    args = build_parser().parse_args(["tune", "--data", "D", "--out", "O", "--budget", "None", "--max-tokens", "9"])
    assert args.budget is None and args.max_tokens == 9


def test_record_keeps_the_larger_count_and_notes_mismatches():
    ledger = Ledger(Budget(price_per_1k_tokens=2.0))
    expected = Usage(queries=4, requests=1, examples=32, tokens=1000)
    ledger.record(Usage(queries=4, requests=1, examples=32, tokens=1500), expected=expected)
    assert ledger.tuning.tokens == 1500 and ledger.tuning.cost == pytest.approx(3.0)
    assert ledger.mismatches == ["server reported 1500 tokens, client counted 1000"]
    ledger.record(Usage(queries=3, requests=1, examples=24, tokens=10), expected=expected)
    # a server that under-reports does not get the client to under-count
    assert ledger.tuning.tokens == 2500
    assert ledger.tuning.queries == 8 and ledger.tuning.requests == 2 and ledger.tuning.examples == 64
    assert len(ledger.mismatches) == 4


def test_evaluation_spending_is_reported_but_not_limited():
    ledger = Ledger(Budget(queries=3))
    usage = Usage(queries=100, requests=1, examples=100, tokens=100)
    ledger.record(usage, expected=usage, tuning=False)
    assert ledger.tuning.queries == 0 and ledger.evaluation.queries == 100
    assert ledger.affordable(5, examples_per_query=1, tokens_per_query=1) == 3
    summary = ledger.summary()
    assert summary["evaluation"]["queries"] == 100 and summary["budget"]["queries"] == 3
    assert "0/3 queries" in ledger.describe()


# ---- a real tuning run under each limit -----------------------------------------------------

@pytest.mark.parametrize("limit", LIMITS)
def test_tuning_stops_at_or_under_each_limit(limit, tiny_encoder, tiny_data, sst2_task, local_backend):
    """A run with only one limit set spends up to it and not past it; the last query that did not fit
    would have crossed it."""
    from bbt.protocol import StatsRequest
    from bbt.tuner import tune

    model, length = str(tiny_encoder), 4
    stats = local_backend.stats(StatsRequest(model=model, task=sst2_task, inputs=tiny_data.train.examples))
    n = len(tiny_data.train)
    tokens_per_query = sum(stats.tokens) + n * length
    price = 0.5
    per_query = {"queries": 1, "requests": None, "examples": n, "tokens": tokens_per_query,
                 "cost": tokens_per_query / 1000 * price}[limit]
    # 37 train-sized queries' worth: a generation of 6 is cut part-way (37 = 6 * 6 + 1 minus dev queries)
    value = {"queries": 37, "requests": 9, "examples": 37 * n, "tokens": 37 * tokens_per_query + 5,
             "cost": 37 * tokens_per_query / 1000 * price * 1.0001}[limit]
    budget = Budget(**{"queries": None, limit: value, "price_per_1k_tokens": price})
    cfg = TuneConfig(model=model, seed=1, prompt_length=length, intrinsic_dim=10, popsize=6, budget=budget)
    ledger = Ledger(budget)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, ledger)
    spent = getattr(ledger.tuning, limit)
    assert spent <= value, f"{limit}: spent {spent} over the limit {value}"
    if per_query is None:
        assert spent == value  # every request allowed was used
    else:
        assert value - spent < per_query, f"{limit}: stopped with {value - spent} left, a query costs {per_query}"
    assert ledger.evaluation.queries == 0
    assert ledger.mismatches == []  # the client's count (what the limits were checked on) is the server's
    assert result.history[-1]["queries_used"] == ledger.tuning.queries
    assert result.generations >= 4
