"""`bbt tune --dry-run` (bbt.estimate) and `bbt demo` (bbt.demo, its bundled task).

The estimate is checked against real short runs on the tiny encoder under each kind of limit:
it sends no evaluate query, its bounds hold what the run really spent, neither crosses a limit,
and its evaluation figures are exact. The demo runs the real SmolLM2, in process and through a
real server.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import httpx
import pytest

from bbt import estimate as est_mod
from bbt.budget import Budget, Ledger
from bbt.cli import main
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.estimate import _PerQuery, _replay, estimate
from bbt.runs import run_tune
from bbt.scoring import evaluate_split
from bbt.session import Session
from conftest import REPO

UNITS = ("queries", "requests", "examples", "tokens", "cost")


class CountingBackend:
    """Passes calls through to a backend and counts them by method."""

    def __init__(self, inner):
        self.inner, self.calls = inner, {"model_info": 0, "stats": 0, "evaluate": 0}

    def model_info(self, model):
        self.calls["model_info"] += 1
        return self.inner.model_info(model)

    def stats(self, request):
        self.calls["stats"] += 1
        return self.inner.stats(request)

    def evaluate(self, request):
        self.calls["evaluate"] += 1
        return self.inner.evaluate(request)

    def close(self):
        pass


def _cfg(path, budget: Budget, **kw) -> TuneConfig:
    """A short run on a tiny model: L=4, d=16, popsize 4."""
    return TuneConfig(**{**dict(model=str(path), seed=0, prompt_length=4, intrinsic_dim=16, popsize=4), **kw}, budget=budget)


# ---- the estimate ----------------------------------------------------------------------------

def test_dry_run_sends_no_evaluate_query(tiny_encoder, local_backend, tiny_data, sst2_task):
    backend = CountingBackend(local_backend)
    est = estimate(backend, _cfg(tiny_encoder, Budget(queries=30)), sst2_task, tiny_data)
    assert backend.calls["evaluate"] == 0
    assert backend.calls["stats"] == est.stats_requests == 3  # train, dev, test: one chunk each
    assert est.tuning.queries == 30 and est.ends_by == ["queries"]
    text = est.describe()
    assert "no evaluate query was sent" in text and "upper bound" in text and "--budget" in text
    assert "note:" not in text
    for kw, flag in (({"local": "cobyla"}, "--local cobyla"), ({"folds": 2}, "--folds 2")):
        assert flag in estimate(backend, _cfg(tiny_encoder, Budget(queries=30), **kw), sst2_task, tiny_data).describe()


def _budgets(per_train_query: int, per_dev_query: int) -> dict[str, Budget]:
    """One budget per kind of limit, each ending the run after a few generations of 4 train queries."""
    return {
        "queries": Budget(queries=23),
        "requests": Budget(queries=None, requests=7),
        "examples": Budget(queries=None, examples=8 * 4 * 5 + 3),  # 8 examples per train and dev query
        "tokens": Budget(queries=None, tokens=5 * 4 * per_train_query + 2 * per_dev_query + 7),
        "cost": Budget(queries=None, cost=0.05, price_per_1k_tokens=1000 * 0.05 / (17.5 * per_train_query)),
        "queries+tokens": Budget(queries=40, tokens=6 * 4 * per_train_query),
    }


@pytest.mark.parametrize("kind", ["queries", "requests", "examples", "tokens", "cost", "queries+tokens"])
def test_estimate_bounds_what_a_real_run_spends(kind, tiny_encoder, local_backend, tiny_data, sst2_task, tmp_path):
    probe = estimate(local_backend, _cfg(tiny_encoder, Budget(queries=4)), sst2_task, tiny_data)
    budget = _budgets(probe.train_tokens_per_query, probe.dev_tokens_per_query)[kind]
    cfg = _cfg(tiny_encoder, budget)
    est = estimate(local_backend, cfg, sst2_task, tiny_data)
    metrics = run_tune(cfg, sst2_task, tiny_data, local_backend, tmp_path / "run", progress=False, log=lambda *a: None)
    real, real_eval = metrics["spending"]["tuning"], metrics["spending"]["evaluation"]

    assert est.ends_by and set(est.ends_by) <= set(kind.split("+"))
    assert est.generations[0] <= metrics["generations"] <= est.generations[1]
    for unit in UNITS:
        low, high = getattr(est.tuning_min, unit), getattr(est.tuning, unit)
        assert low <= real[unit] + 1e-9 and real[unit] <= high + 1e-9, f"{unit}: real {real[unit]} outside [{low}, {high}]"
        limit = getattr(budget, unit)
        if limit is not None and (unit != "cost" or budget.price_per_1k_tokens):
            assert high <= limit + 1e-9 and real[unit] <= limit + 1e-9, f"{unit}: over the limit {limit}"
    # evaluation is not guessed: it is exact, but for the plain model's pass through the chosen
    # words, which the estimate counts and a run skips where they are the task's own (as the plain pass costs)
    skipped = Ledger(Budget(price_per_1k_tokens=budget.price_per_1k_tokens))
    if metrics["verbalizer"]["label_words"] == 1:
        evaluate_split(Session(local_backend, cfg.model, skipped), sst2_task, tiny_data.test, None)
    for unit in ("queries", "requests", "examples", "tokens"):
        assert getattr(est.evaluation, unit) - getattr(skipped.evaluation, unit) == real_eval[unit], unit
    assert est.evaluation.cost - skipped.evaluation.cost == pytest.approx(real_eval["cost"])


@pytest.mark.parametrize("model, label_words, kind", [("tiny_encoder", None, "queries"), ("tiny_gpt2", None, "requests"),
                                                       ("tiny_gpt2", 2, "tokens")])
def test_estimate_counts_the_queries_that_choose_the_words(model, label_words, kind, request, local_backend, tiny_data,
                                                           sst2_task, tmp_path):
    path = request.getfixturevalue(model)
    probe = estimate(local_backend, _cfg(path, Budget(queries=4), verbalizer="manual"), sst2_task, tiny_data)
    budget = _budgets(probe.train_tokens_per_query, probe.dev_tokens_per_query)[kind]
    cfg = _cfg(path, budget, verbalizer="auto", label_words=label_words)
    est = estimate(local_backend, cfg, sst2_task, tiny_data)
    manual = estimate(local_backend, cfg.model_copy(update={"verbalizer": "manual", "label_words": None}), sst2_task,
                      tiny_data)
    metrics = run_tune(cfg, sst2_task, tiny_data, local_backend, tmp_path / "run", progress=False, log=lambda *a: None)
    real, real_eval = metrics["spending"]["tuning"], metrics["spending"]["evaluation"]
    chose = metrics["verbalizer"]["queries"]
    assert est.choice_queries[0] <= chose <= est.choice_queries[1] and est.choice_queries[1] > 0
    assert "choosing the words" in est.describe() and "choosing the words" not in manual.describe()
    for unit in UNITS:
        low, high = getattr(est.tuning_min, unit), getattr(est.tuning, unit)
        assert low <= real[unit] + 1e-9 and real[unit] <= high + 1e-9, f"{unit}: real {real[unit]} outside [{low}, {high}]"
        limit = getattr(budget, unit)
        if limit is not None and unit != "cost":
            assert high <= limit + 1e-9, f"{unit}: over the limit {limit}"
    # the words' pass of the plain model on test is counted, whether or not the run needed it
    assert manual.evaluation.queries <= real_eval["queries"] <= est.evaluation.queries
    assert est.evaluation.queries == manual.evaluation.queries * 4 // 3


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
def test_estimate_knows_when_rounds_end_the_run(method, tiny_encoder, local_backend, tiny_data, sst2_task, tmp_path):
    cfg = _cfg(tiny_encoder, Budget(queries=5000), method=method, rounds=2)
    est = estimate(local_backend, cfg, sst2_task, tiny_data)
    metrics = run_tune(cfg, sst2_task, tiny_data, local_backend, tmp_path / "run", progress=False, log=lambda *a: None)
    layers = 1 if method == "bbt" else 2
    assert est.ends_by == [est_mod.ROUNDS] and est.generations == (2 * layers, 2 * layers)
    assert metrics["generations"] == 2 * layers and metrics["stop_reason"] == "rounds"
    assert est.tuning_min.queries <= metrics["queries_used"] <= est.tuning.queries
    assert "the run ends after 2 rounds (--rounds)" in est.describe()


def test_estimate_says_patience_may_end_the_run_sooner(tiny_encoder, local_backend, tiny_data, sst2_task):
    est = estimate(local_backend, _cfg(tiny_encoder, Budget(queries=200), patience=3), sst2_task, tiny_data)
    assert "it may end sooner (--patience 3): after as few as 4 generations" in est.describe()
    plain = estimate(local_backend, _cfg(tiny_encoder, Budget(queries=200)), sst2_task, tiny_data)
    assert "--patience" not in plain.describe()


def test_a_budget_without_limits_is_refused_before_any_request(tiny_encoder, local_backend, tiny_data, sst2_task):
    backend = CountingBackend(local_backend)
    unchecked = Budget.model_construct(queries=None, requests=None, examples=None, tokens=None, cost=5.0,
                                       price_per_1k_tokens=0.0)  # a cost without a price limits nothing
    with pytest.raises(ConfigError, match="no limit.*never end.*--budget"):
        estimate(backend, _cfg(tiny_encoder, Budget()).model_copy(update={"budget": unchecked}), sst2_task, tiny_data)
    assert sum(backend.calls.values()) == 0


def test_a_budget_below_one_query_tunes_nothing(tiny_encoder, local_backend, tiny_data, sst2_task):
    est = estimate(local_backend, _cfg(tiny_encoder, Budget(queries=None, tokens=10)), sst2_task, tiny_data)
    assert est.generations == (0, 0) and est.tuning.queries == 0 and est.ends_by == ["tokens"]
    assert "does not afford one train query" in est.describe()


@pytest.mark.parametrize("every", [True, False])
def test_long_replays_leap_to_the_same_end(every, monkeypatch):
    """Very long runs add whole generations in bulk; the result is what one-by-one replay gives."""
    budget = Budget(queries=None, tokens=1_234_567, requests=9_000, price_per_1k_tokens=0.3, cost=1e9)
    train, dev = _PerQuery(16, 700), _PerQuery(16, 650)
    monkeypatch.setattr(est_mod, "_LEAP_AFTER", 10**9)
    slow = _replay(budget, 7, train, dev, every_generation_improves=every)
    monkeypatch.setattr(est_mod, "_LEAP_AFTER", 3)
    fast = _replay(budget, 7, train, dev, every_generation_improves=every)
    assert (fast.generations, fast.dev_queries, fast.ends_by) == (slow.generations, slow.dev_queries, slow.ends_by)
    for unit in ("queries", "requests", "examples", "tokens"):
        assert getattr(fast.ledger.tuning, unit) == getattr(slow.ledger.tuning, unit)
    assert fast.ledger.tuning.cost == pytest.approx(slow.ledger.tuning.cost)


def test_dry_run_from_the_command_line(tiny_encoder, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    code = main(["tune", "--data", str(data_dir), "--model", str(tiny_encoder), "--prompt-length", "4",
                 "--intrinsic-dim", "16", "--popsize", "4", "--budget", "30", "--max-tokens", "100000",
                 "--price-per-1k-tokens", "0.002", "--out", str(out), "--dry-run"])
    assert code == 0
    text = capsys.readouterr().out
    assert "upper bound" in text and "cost" in text and "the run ends when" in text
    assert not out.exists()  # nothing tuned, nothing written


def test_rounds_from_the_command_line(tiny_encoder, data_dir, tmp_path, capsys):
    code = main(["tune", "--data", str(data_dir), "--model", str(tiny_encoder), "--method", "bbtv2", "--rounds", "1",
                 "--prompt-length", "4", "--intrinsic-dim", "16", "--popsize", "4", "--out", str(tmp_path / "r"), "--dry-run"])
    assert code == 0
    text = capsys.readouterr().out
    assert "2 generations of up to 4 train queries" in text and "the run ends after 1 round (--rounds)" in text


# ---- the demo --------------------------------------------------------------------------------

def test_demo_data_is_well_formed():
    from bbt.demo import DEMO_DIR, demo_task

    task, data = demo_task()
    assert len(task.labels) == len(task.label_texts) == len(task.verbalizer) >= 2
    splits = {"train": data.train, "dev": data.dev, "test": data.test}
    for name, split in splits.items():
        assert all(0 <= y < len(task.labels) for y in split.labels), name
        texts = [e.text for e in split.examples]
        assert len(set(texts)) == len(texts), f"{name} repeats a text"
        assert all(0 < len(t) <= 200 for t in texts), name
    for name in ("train", "dev"):
        assert sorted(splits[name].labels) == sorted(list(range(len(task.labels))) * 8), f"{name}: 8 per class"
    assert 40 <= len(data.test) <= 60
    assert min(data.test.labels.count(c) for c in range(len(task.labels))) >= 15  # roughly balanced
    seen = [{e.text.lower() for e in s.examples} for s in splits.values()]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2]), "splits share a text"
    for line in (DEMO_DIR / "test.jsonl").read_text(encoding="utf-8").splitlines():
        assert set(json.loads(line)) == {"text", "label"}


def test_demo_without_the_server_extra_says_what_to_install(monkeypatch, tmp_path, capsys):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "uvicorn" else real(name, *a))
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 1
    err = capsys.readouterr().err
    assert "uvicorn" in err and "pip install 'bbt[server]'" in err
    assert not (tmp_path / "demo").exists()


def _check_demo_output(text: str, out) -> dict:
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 < metrics["queries_used"] <= 40
    found = re.search(r"test accuracy on \d+ examples: (\d\.\d{3}) for the plain model .*, (\d\.\d{3}) with the "
                      r"tuned prompt \(([+-]\d+\.\d) points\); the search started from (\d\.\d{3})", text)
    assert found, text
    plain, tuned, gain, zero = (float(x) for x in found.groups())
    assert [plain, tuned, zero] == [round(metrics[k], 3) for k in ("no_prompt_test_acc", "test_acc", "zero_prompt_test_acc")]
    assert gain == round(100 * (metrics["test_acc"] - metrics["no_prompt_test_acc"]), 1)
    assert f"spent {metrics['queries_used']} queries" in text and str(out) in text
    return metrics


@pytest.mark.slow
def test_demo_in_process(smollm2, tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--in-process", "--budget", "40", "--out", str(out)]) == 0
    metrics = _check_demo_output(capsys.readouterr().out, out)
    assert metrics["spending"]["evaluation"]["queries"] == 4  # no prompt, zero prompt, tuned; no prompt on dev
    # the demo again replaces its last run (a `bbt tune` would refuse the folder)
    assert main(["demo", "--in-process", "--budget", "20", "--out", str(out)]) == 0
    again = _check_demo_output(capsys.readouterr().out, out)
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    assert again["queries_used"] == sum(x["queries"] for x in ledger if x["purpose"] == "tuning") == 20


@pytest.mark.slow
def test_demo_through_a_real_server(smollm2, tmp_path):
    out = tmp_path / "demo"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run([sys.executable, "-m", "bbt.cli", "demo", "--budget", "40", "--out", str(out)], cwd=REPO,
                          capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    _check_demo_output(done.stdout, out)
    url = re.search(r"server ready at (http://127\.0\.0\.1:\d+)", done.stdout).group(1)
    assert "server stopped" in done.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["endpoint"] == [url]
    with pytest.raises(httpx.TransportError):  # the server is gone
        httpx.get(url + "/v1/health", timeout=2)
