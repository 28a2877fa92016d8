"""The two-stage search (--local cobyla): CMA-ES, then COBYLA in CMA-ES's principal subspace, in one
budget and ledger, resumable; and the selection rule (--select)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
from pydantic import ValidationError

from bbt import local_search
from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.optimizer import CMAES
from bbt.tuner import Evaluation, _better, tune


def test_subspace_follows_the_covariance_and_its_scale():
    for diagonal in (False, True):
        es = CMAES(6, popsize=8, sigma=0.5, seed=3, diagonal=diagonal)
        for _ in range(6):  # a loss that cares only for coordinate 2: the distribution stretches along it
            x = es.ask()
            es.tell(x, (x[:, 2] - 3.0) ** 2)
        basis = local_search.subspace(es, 2)
        assert basis.shape == (6, 2)
        lengths = np.linalg.norm(basis, axis=0)
        assert lengths[0] >= lengths[1] > 0  # the widest axis first, one std long
        if not diagonal:
            values = np.linalg.eigvalsh(np.asarray(es.es.C))
            assert lengths[0] == pytest.approx(es.es.sigma * np.sqrt(values.max()))
    assert local_search.subspace(CMAES(3, popsize=4, seed=0), 10).shape == (3, 3)  # k is capped at d


def test_cobyla_resumed_from_its_losses_continues_as_if_never_stopped():
    target = np.array([0.5, -1.0, 2.0])
    seen = []

    def objective(x):
        seen.append(x.copy())
        return float(((x - target) ** 2).sum())

    full: list[float] = []
    assert local_search.cobyla(objective, 3, full, max_evals=40) == "budget"
    assert len(full) == 40 and min(full) < 0.5
    first = seen[:]

    cut: list[float] = []
    seen.clear()

    def stopping(x):
        if len(cut) == 15:
            raise local_search.Stop
        return objective(x)

    assert local_search.cobyla(stopping, 3, cut, max_evals=40) == "budget"
    assert cut == full[:15]
    seen.clear()
    local_search.cobyla(objective, 3, cut, max_evals=40)  # the first 15 come from `cut`: not evaluated again
    assert cut == full and len(seen) == 25
    np.testing.assert_array_equal(seen[0], first[15])

    near: list[float] = []
    reason = local_search.cobyla(lambda x: float(((x - target) ** 2).sum()), 3, near, max_evals=5000)
    assert reason == "converged" and min(near) < 1e-6


def small(**extra) -> TuneConfig:
    return TuneConfig(seed=5, prompt_length=4, intrinsic_dim=8, popsize=6, budget=Budget(queries=60), **extra)


def test_second_stage_spends_its_share_one_candidate_per_query(tiny_encoder, local_backend, tiny_data, sst2_task):
    cfg = small(model=str(tiny_encoder), local="cobyla", local_share=0.5, local_dim=3)
    ledger = Ledger(cfg.budget)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, ledger)
    stages = [r.get("stage", "cma") for r in result.history]
    first = [r for r in result.history if "stage" not in r]
    second = [r for r in result.history if r.get("stage") == "local"]
    assert stages == sorted(stages) and first and second  # CMA-ES first, then COBYLA
    assert first[-1]["queries_used"] <= 30 and ledger.tuning.queries <= 60  # within the share, within the budget
    assert sum(r["candidates"] for r in second) + sum(r["candidates"] for r in first) + sum(
        "dev_loss" in r for r in result.history) == ledger.tuning.queries
    assert ledger.tuning.requests == ledger.tuning.queries - 6 * len(first) + len(first)  # stage 2: K = 1
    assert result.train.loss <= min(r["loss_min"] for r in first)
    assert ledger.tuning.queries >= 55  # it used the budget, unless COBYLA converged (it cannot in 30 queries)


def run_killed_and_resumed(cfg, kill_after, backend, task, data, tmp_path):
    """The run uninterrupted, and the same run killed right after the first checkpoint whose state
    `kill_after` accepts, then resumed from it on the rewound ledger: (want, got, resumed ledger)."""
    want = tune(backend, cfg, task, data.train, data.dev, Ledger(cfg.budget))
    saved = []

    class Killed(Exception):
        pass

    def on_state(state):
        saved.append(copy.deepcopy(state))
        if kill_after(state):
            raise Killed

    path = tmp_path / "ledger.jsonl"
    ledger = Ledger(cfg.budget, path)
    with pytest.raises(Killed):
        tune(backend, cfg, task, data.train, data.dev, ledger, on_state=on_state)
    ledger.close()
    again = Ledger(cfg.budget, path)
    again.rewind(saved[-1].ledger_step)
    return want, tune(backend, cfg, task, data.train, data.dev, again, state=saved[-1]), again


def test_second_stage_resumes_exactly(tiny_encoder, local_backend, tiny_data, sst2_task, tmp_path):
    cfg = small(model=str(tiny_encoder), local="cobyla", local_share=0.5, local_dim=3)
    want, got, again = run_killed_and_resumed(  # killed inside the second stage
        cfg, lambda state: state.stage == "local" and len(state.local_losses) >= 8,
        local_backend, sst2_task, tiny_data, tmp_path)
    np.testing.assert_array_equal(got.prompt.z, want.prompt.z)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(got.history) == strip(want.history) and again.tuning.queries == 60


def test_settings_are_checked():
    with pytest.raises(ValidationError, match="for method 'bbt'"):
        TuneConfig(method="bbtv2", local="cobyla")
    with pytest.raises(ValidationError, match="budget in queries"):
        TuneConfig(local="cobyla", budget=Budget(queries=None, requests=10))
    with pytest.raises(ValidationError):
        TuneConfig(local="cobyla", local_share=1.0)


def test_selection_by_dev_loss_metric_or_train_and_dev():
    a, b = Evaluation(loss=0.5, metric=0.7, accuracy=0.7), Evaluation(loss=0.6, metric=0.8, accuracy=0.8)
    train = Evaluation(loss=0.3, metric=0.9, accuracy=0.9)
    assert _better((b, train), (a, train), "dev-metric") and not _better((a, train), (b, train), "dev-metric")
    assert _better((a, train), (b, train), "dev-loss") and not _better((b, train), (a, train), "dev-loss")
    tie = Evaluation(loss=0.4, metric=0.7, accuracy=0.7)
    assert _better((tie, train), (a, train), "dev-metric")  # equal metric: the lower loss wins
    assert not _better((a, train), (a, train), "dev-metric")  # an exact tie keeps the earlier prompt
    # train-dev pools both splits: b is better on dev, but a's train score more than makes up for it
    strong, weak = Evaluation(loss=0.2, metric=1.0, accuracy=1.0), Evaluation(loss=0.6, metric=0.75, accuracy=0.75)
    assert _better((a, strong), (b, weak), "train-dev") and not _better((b, weak), (a, strong), "train-dev")
    assert _better((b, weak), (a, strong), "dev-metric")
    # the same pooled metric (0.75 + 0.875, exact in binary): the lower pooled loss wins
    x = (Evaluation(loss=0.5, metric=0.75, accuracy=0.75), Evaluation(loss=0.1, metric=0.875, accuracy=0.875))
    y = (Evaluation(loss=0.5, metric=0.875, accuracy=0.875), Evaluation(loss=0.9, metric=0.75, accuracy=0.75))
    assert _better(x, y, "train-dev") and not _better(y, x, "train-dev")


@pytest.mark.parametrize("select", ["dev-metric", "dev-loss", "train-dev"])
def test_a_run_returns_the_dev_checked_prompt_its_rule_ranks_first(select, tiny_encoder, local_backend, tiny_data,
                                                                   sst2_task):
    cfg = small(model=str(tiny_encoder), select=select)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    checked = [r for r in result.history if "dev_loss" in r]
    assert checked  # every new best on train is scored on dev
    keys = {"dev-metric": lambda r: (-r["dev_metric"], r["dev_loss"]),
            "dev-loss": lambda r: (r["dev_loss"],),
            "train-dev": lambda r: (-(r["dev_metric"] + r["train_acc"]), r["dev_loss"] + r["loss_min"])}[select]
    want = min(range(len(checked)), key=lambda i: (keys(checked[i]), i))  # the first of equals
    assert result.dev.loss == checked[want]["dev_loss"] and result.train.loss == checked[want]["loss_min"]


def test_two_folds_swap_train_and_dev_halfway(tiny_encoder, local_backend, tiny_data, sst2_task):
    from bbt.data import Split
    from bbt.session import Session
    from bbt.tuner import Scorer

    cfg = small(model=str(tiny_encoder), folds=2)
    train, dev = tiny_data.train, Split(tiny_data.dev.examples[:4], tiny_data.dev.labels[:4])  # sizes tell splits apart
    ledger = Ledger(cfg.budget)
    result = tune(local_backend, cfg, sst2_task, train, dev, ledger)
    folds = [r["fold"] for r in result.history]
    assert folds == sorted(folds) and set(folds) == {0, 1}
    assert max(r["queries_used"] for r in result.history if r["fold"] == 0) <= 30 and ledger.tuning.queries <= 60
    # fold 0 fits the 8 train inputs and checks on the 4 of dev; fold 1 the other way round
    sizes = {0: (len(train), len(dev)), 1: (len(dev), len(train))}
    assert ledger.tuning.examples == sum(r["candidates"] * sizes[r["fold"]][0] + ("dev_loss" in r) * sizes[r["fold"]][1]
                                         for r in result.history)
    assert result.fold == [r["fold"] for r in result.history if r.get("new_best_dev")][-1]
    # whichever fold it came from, the scores reported as train and dev are the prompt's on those splits
    for split, want in ((train, result.train), (dev, result.dev)):
        losses, _, accs, _ = Scorer(Session(local_backend, cfg.model, Ledger(Budget(queries=10))), cfg, sst2_task, split, tuning=False).score(
            result.prompt, result.prompt.z[None])
        assert losses[0] == pytest.approx(want.loss, rel=1e-5) and accs[0] == want.accuracy


def test_two_folds_resume_exactly(tiny_encoder, local_backend, tiny_data, sst2_task, tmp_path):
    cfg = small(model=str(tiny_encoder), folds=2, method="bbtv2")
    want, got, _ = run_killed_and_resumed(  # killed after the first checkpoint of the second fold
        cfg, lambda state: state.fold == 1 and state.generation > state.fold_start,
        local_backend, sst2_task, tiny_data, tmp_path)
    np.testing.assert_array_equal(got.prompt.z, want.prompt.z)
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(got.history) == strip(want.history) and got.fold == want.fold


def test_fold_settings_are_checked():
    with pytest.raises(ValidationError, match="choose one"):
        TuneConfig(folds=2, local="cobyla")
    with pytest.raises(ValidationError, match="budget in queries"):
        TuneConfig(folds=2, budget=Budget(queries=None, requests=10))
    with pytest.raises(ValidationError):
        TuneConfig(folds=3)
