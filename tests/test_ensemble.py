"""Prompt ensembles: search seeds apart from the split, members scored in one request, votes,
`bbt tune --ensemble`, and `bbt evaluate/predict` with several runs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt import ensemble, rundir
from bbt.budget import Budget, Ledger
from bbt.cli import main
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.runs import run_ensemble, share_budget
from bbt.scoring import evaluate_split
from bbt.tuner import tune
from bbt.session import Session
from recording import RecordingBackend


def _cfg(path, **kw) -> TuneConfig:
    base = dict(model=str(path), seed=13, prompt_length=4, intrinsic_dim=10, popsize=4, budget=Budget(queries=12))
    return TuneConfig(**{**base, **kw})


def test_search_seed_changes_the_search_not_the_split_or_p0(tiny_gpt2, local_backend, tiny_data, sst2_task):
    runs = {s: tune(local_backend, _cfg(tiny_gpt2, search_seed=s, init="vocab"), sst2_task, tiny_data.train,
                    tiny_data.dev, Ledger(Budget(queries=12))) for s in (None, 13, 1)}
    assert np.array_equal(runs[None].prompt.z, runs[13].prompt.z)  # default: the split seed, as before
    assert not np.array_equal(runs[1].prompt.z, runs[13].prompt.z)
    assert runs[1].prompt.projections != runs[13].prompt.projections
    assert runs[1].prompt.init_seed == runs[13].prompt.init_seed  # p0 follows the split: members share it


def test_members_in_one_request_score_as_each_alone(tiny_gpt2, local_backend, tiny_data, sst2_task):
    prompts = [tune(local_backend, _cfg(tiny_gpt2, search_seed=s), sst2_task, tiny_data.train, tiny_data.dev,
                    Ledger(Budget(queries=12))).prompt for s in (1, 2, 3)]
    counting = RecordingBackend(local_backend)
    ledger = Ledger(Budget())
    logits = ensemble.score_prompts(Session(counting, str(tiny_gpt2), ledger), sst2_task, tiny_data.test, prompts)
    assert len(counting.requests) == 1 and ledger.evaluation.queries == 3
    assert logits.shape == (3, len(tiny_data.test), 2)
    for p, got in zip(prompts, logits):
        _, alone = evaluate_split(Session(local_backend, str(tiny_gpt2)), sst2_task, tiny_data.test, p)
        np.testing.assert_allclose(got, alone, atol=1e-5)


def test_majority_vote_breaks_ties_by_mean_probability():
    # 2 members, 3 inputs, 2 classes
    logits = np.array([
        [[2.0, 0.0], [0.0, 1.0], [0.0, 3.0]],
        [[1.0, 0.0], [0.5, 0.0], [0.0, 1.0]],
    ])
    assert ensemble.combine(logits, "majority").argmax(1).tolist() == [0, 1, 1]  # input 2: a tie, class 1 more probable
    mean = ensemble.combine(logits, "mean")
    np.testing.assert_allclose(mean.sum(1), 1.0)
    three = np.array([[[1.0, 0.0]], [[1.0, 0.0]], [[0.0, 9.0]]])  # 2 votes beat one confident member
    assert ensemble.combine(three, "majority").argmax(1).tolist() == [0]
    assert ensemble.combine(three, "mean").argmax(1).tolist() == [1]


def test_budget_is_the_whole_ensembles():
    shared = share_budget(Budget(queries=100, tokens=1000), 3)
    assert (shared.queries, shared.tokens) == (33, 333)
    with pytest.raises(ConfigError, match="cannot be shared"):
        share_budget(Budget(queries=2), 3)


def test_tune_ensemble_writes_members_and_resumes_for_free(tiny_gpt2, local_backend, tiny_data, sst2_task, tmp_path):
    cfg = _cfg(tiny_gpt2, budget=Budget(queries=36))
    out = tmp_path / "ens"
    got = run_ensemble(cfg, 3, sst2_task, tiny_data, local_backend, out, progress=False, log=lambda *a: None)
    index = json.loads((out / rundir.INDEX_FILE).read_text())
    assert index["members"] == ["member-1", "member-2", "member-3"] and index["version"] == 1
    members = [json.loads((out / m / "metrics.json").read_text()) for m in index["members"]]
    assert all(m["queries_used"] <= 12 for m in members) and got["queries_used"] == sum(m["queries_used"] for m in members)
    seeds = [json.loads((out / m / "config.json").read_text())["config"]["search_seed"] for m in index["members"]]
    assert seeds == [13, 14, 15]
    assert got["member_test"] == pytest.approx([m["test_acc"] for m in members])
    assert got["mean_member_test"] == pytest.approx(np.mean(got["member_test"]))
    assert 1 <= got["best_dev_member"] <= 3 and got["no_prompt_test_acc"] == members[0]["no_prompt_test_acc"]
    # the default --verbalizer auto: every member chose the same words, and the ensemble is read through them
    assert len({json.dumps(m["verbalizer"]["entries"]) for m in members}) == 1
    assert got["no_prompt_verbalizer_test_acc"] == members[0]["no_prompt_verbalizer_test_acc"]
    paid = [len((out / m / "ledger.jsonl").read_text().splitlines()) for m in index["members"]]
    again = run_ensemble(cfg, 3, sst2_task, tiny_data, local_backend, out, progress=False, log=lambda *a: None, resume=True)
    assert again["member_test"] == got["member_test"]
    assert [len((out / m / "ledger.jsonl").read_text().splitlines()) for m in index["members"]] == paid  # no member redone
    with pytest.raises(ConfigError, match="already holds an ensemble"):
        run_ensemble(cfg, 3, sst2_task, tiny_data, local_backend, out, progress=False, log=lambda *a: None)


def _tune_cli(model, data_dir, out, *extra):
    assert main(["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
                 "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "8",
                 "--out", str(out), "--no-cache", "--quiet", *extra]) == 0


def test_evaluate_and_predict_several_runs(tiny_gpt2, data_dir, tmp_path, capsys):
    runs = [tmp_path / f"r{s}" for s in (1, 2, 3)]
    for s, run in zip((1, 2, 3), runs):
        _tune_cli(tiny_gpt2, data_dir, run, "--search-seed", str(s))
    capsys.readouterr()
    args = ["evaluate"]
    for run in runs:
        args += ["--run", str(run)]
    assert main(args + ["--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    singles = [json.loads((r / "metrics.json").read_text())["test_acc"] for r in runs]
    assert [m["acc"] for m in result["members"]] == pytest.approx(singles)
    assert result["mean_member_acc"] == pytest.approx(np.mean(singles)) and result["best_member_acc"] == max(singles)
    assert 0 <= result["ensemble_acc"] <= 1 and result["vote"] == "majority"
    assert result["requests"] == 1 and result["queries"] == 3  # one request for the 3 members
    assert result["no_prompt_acc"] == json.loads((runs[0] / "metrics.json").read_text())["no_prompt_test_acc"]

    predict = ["predict", "--run", str(runs[0]), "--run", str(runs[1]), "--vote", "mean", "a great film", "dull"]
    assert main(predict) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["a great film", "dull"]
    assert all(abs(sum(x["probs"].values()) - 1) < 1e-3 for x in lines)


def test_members_must_share_the_task(tiny_gpt2, data_dir, tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    _tune_cli(tiny_gpt2, data_dir, a)
    _tune_cli(tiny_gpt2, data_dir, b)
    artifact = json.loads((b / "prompt.json").read_text())
    artifact["task"]["template"] = artifact["task"]["template"] + " !"
    (b / "prompt.json").write_text(json.dumps(artifact))
    assert main(["evaluate", "--run", str(a), "--run", str(b)]) != 0
    assert "template" in capsys.readouterr().err


def test_an_ensemble_folder_stands_for_its_members(tmp_path):
    rundir.write_index(tmp_path, ["member-1", "member-2"])
    assert rundir.member_runs([tmp_path, tmp_path / "other"]) == [tmp_path / "member-1", tmp_path / "member-2",
                                                                    tmp_path / "other"]
    (tmp_path / rundir.INDEX_FILE).write_text("{")
    with pytest.raises(ConfigError, match="not a bbt ensemble index"):
        rundir.member_runs([tmp_path])
