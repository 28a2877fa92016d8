"""`bbt sweep`: one run per cell scored at several budgets, reruns that pay nothing, claims, failed
cells that do not stop the sweep, local worker processes, and the report."""

from __future__ import annotations

import json
import os
import shutil
import socket

import numpy as np
import pytest

from bbt import sweeps
from bbt.cli import main
from bbt.rundir import prompt_at


def _args(model, data_dir, out, *extra):
    return ["sweep", "--tasks", data_dir.name, "--data-root", str(data_dir.parent), "--seeds", "13", "42",
            "--methods", "bbt", "bbtv2", "--budgets", "8", "16", "--model", str(model), "--prompt-length", "4",
            "--set", "intrinsic_dim=8", "popsize=4", "--test-limit", "0", "--out", str(out), *extra]


def _ledger_lines(out):
    return {p.parent.name: len(p.read_text().splitlines()) for p in (out / "cells").glob("*/ledger.jsonl")}


def test_a_sweep_scores_each_budget_from_one_run_and_a_rerun_pays_nothing(tiny_encoder, data_dir, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.setenv("BBT_CACHE", str(tmp_path / "cache.sqlite"))
    out = tmp_path / "S"
    assert main(_args(tiny_encoder, data_dir, out)) == 0
    rows = sweeps.rows(out)
    assert len(rows) == 2 * 2 * 2  # seeds x methods x budgets
    for r in rows:
        assert r["queries_used"] <= r["budget"] and 0 <= r["test"] <= 1
    cell = out / "cells" / f"{data_dir.name}-s13-bbt"
    metrics = json.loads((cell / "metrics.json").read_text())
    assert metrics["queries_used"] <= 16  # one run, to the largest budget
    at16 = next(r for r in rows if r["cell"] == cell.name and r["budget"] == 16)
    assert at16["test"] == pytest.approx(metrics["test_acc"])  # at the full budget: the run's own prompt
    path = json.loads((cell / "path.json").read_text())["points"]
    want = next((p["z"] for p in reversed(path) if p["queries"] <= 8), None)
    got = prompt_at(cell, 8).z
    assert np.array_equal(got, np.zeros_like(got) if want is None else np.asarray(want))

    before = _ledger_lines(out)
    capsys.readouterr()
    assert main(_args(tiny_encoder, data_dir, out)) == 0
    assert _ledger_lines(out) == before  # nothing asked again: finished cells are skipped
    assert "4 done, 0 to run" in capsys.readouterr().out

    assert main(["sweep", "report", str(out), "--csv", str(tmp_path / "t.csv"), "--plot", str(tmp_path / "t.png")]) == 0
    text = capsys.readouterr().out
    body = [line for line in text.splitlines() if line.startswith(data_dir.name)]
    assert len(body) == 4  # methods x budgets, mean over the 2 seeds
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    csv_lines = (tmp_path / "t.csv").read_text().splitlines()
    assert len(csv_lines) == 5
    # the cells whose prompt failed the held-out check are named, with their margin, as metrics.json has them
    failed = {c.name: json.loads((c / "metrics.json").read_text())["held_out_check"] for c in (out / "cells").iterdir()
              if (c / "metrics.json").exists()}
    failed = {name: chk["above_chance"] for name, chk in failed.items() if not chk["passed"]}
    assert sweeps.unchecked(out) == failed
    named = [line for line in text.splitlines() if line.startswith("held-out check failed")]
    assert len(named) == (1 if failed else 0) and all(name in named[0] for name in failed)
    # the sweep's fixed settings (--set) are in the report, though no cell's rows record them
    assert "every cell: " in text and "intrinsic_dim=8" in text.split("every cell: ")[1].splitlines()[0]
    assert '""intrinsic_dim"": 8' in csv_lines[1]


def test_a_different_grid_in_the_same_folder_is_refused(tiny_encoder, data_dir, tmp_path, capsys):
    out = tmp_path / "S"
    spec = sweeps.SweepSpec(tasks=[data_dir.name], seeds=[13], budgets=[8], data_root=str(data_dir.parent),
                           model=str(tiny_encoder), settings={"prompt_length": 4, "intrinsic_dim": 8, "popsize": 4})
    sweeps.run_sweep(spec, out, log=lambda *a: None)
    other = sweeps.SweepSpec(**{**spec.__dict__, "budgets": [16]})
    with pytest.raises(Exception, match="different sweep"):
        sweeps.run_sweep(other, out, log=lambda *a: None)


def test_a_sweep_from_before_automatic_words_keeps_the_own_words(tiny_encoder, data_dir, tmp_path):
    out = tmp_path / "S"
    spec = sweeps.SweepSpec(tasks=[data_dir.name], seeds=[13], budgets=[8], data_root=str(data_dir.parent),
                           model=str(tiny_encoder), settings={"prompt_length": 4, "intrinsic_dim": 8, "popsize": 4})
    out.mkdir()
    old = {"version": 1, **spec.__dict__}
    old.pop("api_key")
    (out / sweeps.SWEEP_FILE).write_text(json.dumps(old))  # as bbt wrote it when --verbalizer manual was the default
    assert sweeps.load_spec(out).config(spec.cells()[0]).verbalizer == "manual"
    with pytest.raises(Exception, match="--set verbalizer=manual"):
        sweeps.run_sweep(spec, out, log=lambda *a: None)  # the old command line would mix the two kinds of cell
    manual = sweeps.SweepSpec(**{**spec.__dict__, "settings": {**spec.settings, "verbalizer": "manual"}})
    sweeps.run_sweep(manual, out, log=lambda *a: None)
    assert json.loads((out / sweeps.SWEEP_FILE).read_text())["version"] == sweeps.SWEEP_VERSION
    cell = next((out / "cells").iterdir())
    assert json.loads((cell / "config.json").read_text())["config"]["verbalizer"] == "manual"


def test_claims_keep_two_workers_off_one_cell(tmp_path):
    path = tmp_path / "cell.claim"
    assert sweeps.claim(path)
    assert not sweeps.claim(path)  # held by a live process (this one)
    path.write_text(json.dumps({"pid": 2**22 + 12345, "host": socket.gethostname()}))  # a pid that is not running
    assert sweeps.claim(path)  # its owner died: taken over
    assert json.loads(path.read_text())["pid"] == os.getpid()


def test_a_failed_cell_does_not_stop_the_sweep(tiny_encoder, data_dir, tmp_path, capsys):
    root = tmp_path / "data"
    shutil.copytree(data_dir, root / "good")
    (root / "broken").mkdir()
    (root / "broken" / "task.json").write_text("{not json")
    out = tmp_path / "S"
    code = main(["sweep", "--tasks", "good", "broken", "--data-root", str(root), "--seeds", "13", "--budgets", "8",
                 "--model", str(tiny_encoder), "--prompt-length", "4", "--set", "intrinsic_dim=8", "popsize=4",
                 "--out", str(out)])
    assert code == 1
    assert [r["task"] for r in sweeps.rows(out)] == ["good"]
    assert "broken-s13-bbt" in sweeps.failures(out)
    assert main(["sweep", "report", str(out)]) == 0
    assert "failed: broken-s13-bbt" in capsys.readouterr().out


def test_worker_processes_give_the_same_table(tiny_encoder, data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("BBT_CACHE", "off")
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(_args(tiny_encoder, data_dir, one, "--methods", "bbt")) == 0
    assert main(_args(tiny_encoder, data_dir, two, "--methods", "bbt", "--workers", "2")) == 0
    assert sweeps.table(one) == sweeps.table(two)


@pytest.mark.slow
def test_a_sweep_on_a_local_ray_gives_the_same_table(tiny_encoder, data_dir, tmp_path, monkeypatch):
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'bbt[ray]')")
    monkeypatch.setenv("BBT_CACHE", "off")
    one, on_ray = tmp_path / "one", tmp_path / "ray"
    assert main(_args(tiny_encoder, data_dir, one, "--methods", "bbt")) == 0
    try:
        assert main(_args(tiny_encoder, data_dir, on_ray, "--methods", "bbt", "--ray")) == 0
    finally:
        import ray

        ray.shutdown()
    assert sweeps.table(one) == sweeps.table(on_ray)


def test_a_cell_with_an_automatic_verbalizer_is_scored_through_its_words(tiny_gpt2, data_dir, tmp_path, monkeypatch):
    from bbt import scoring

    scored_with = []
    inner = scoring.evaluate_split

    def spy(session, task, split, prompt, *args, **kwargs):
        scored_with.append(task)
        return inner(session, task, split, prompt, *args, **kwargs)

    monkeypatch.setattr(scoring, "evaluate_split", spy)
    out = tmp_path / "S"
    spec = sweeps.SweepSpec(tasks=[data_dir.name], seeds=[13], budgets=[12, 20], data_root=str(data_dir.parent),
                           model=str(tiny_gpt2), test_limit=0,
                           settings={"prompt_length": 4, "intrinsic_dim": 8, "popsize": 4, "verbalizer": "auto",
                                     "label_words": 3})
    sweeps.run_sweep(spec, out, log=lambda *a: None)
    cell = next((out / "cells").iterdir())
    metrics = json.loads((cell / "metrics.json").read_text())
    assert any(isinstance(e, list) for e in metrics["verbalizer"]["entries"])
    at20 = next(r for r in sweeps.rows(out) if r["budget"] == 20)
    assert at20["test"] == pytest.approx(metrics["test_acc"])  # the run's own prompt, read as the run read it
    budget_scores = scored_with[-2:]  # after the run: one evaluation per budget, through the chosen words
    assert all(t.verbalizer == metrics["verbalizer"]["entries"] for t in budget_scores)


@pytest.mark.slow
def test_kill_9_during_a_sweep_then_rerun_pays_nothing_twice(tiny_encoder, data_dir, tmp_path, monkeypatch):
    """The issue's check: a real `bbt sweep` process killed by SIGKILL mid-cell, run again: every cell
    complete, each cell's ledger what an uninterrupted sweep paid, and the same table."""
    import subprocess
    import sys
    from pathlib import Path

    from test_resume import paid, sigkill_when

    repo = Path(__file__).resolve().parents[1]
    cache = tmp_path / "cache.sqlite"
    # the clean sweep gets a cache of its own: a cache also spares a run its own repeated requests
    monkeypatch.setenv("BBT_CACHE", str(tmp_path / "clean-cache.sqlite"))
    clean, out = tmp_path / "clean", tmp_path / "S"

    def args(o):  # argparse keeps the last of a repeated flag
        return _args(tiny_encoder, data_dir, o, "--methods", "bbt", "--budgets", "96", "192")
    assert main(args(clean)) == 0

    env = {**os.environ, "PYTHONPATH": str(repo), "BBT_CACHE": str(cache)}
    proc = subprocess.Popen([sys.executable, "-m", "bbt.cli", *args(out)], cwd=repo, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    second = out / "cells" / f"{data_dir.name}-s42-bbt" / "ledger.jsonl"  # the second cell, part way in
    sigkill_when(proc, lambda: second.exists() and second.read_text().count("\n") >= 10)
    assert (out / "cells" / f"{data_dir.name}-s13-bbt" / sweeps.SCORES_FILE).exists()
    assert not (second.parent / sweeps.SCORES_FILE).exists()

    monkeypatch.setenv("BBT_CACHE", str(cache))
    assert main(args(out)) == 0  # the dead worker's claim is taken over, the cell resumes
    cells = sorted(p.name for p in (out / "cells").iterdir() if p.is_dir())
    assert all((out / "cells" / c / sweeps.SCORES_FILE).exists() for c in cells) and len(cells) == 2
    assert {c: paid(out / "cells" / c) for c in cells} == {c: paid(clean / "cells" / c) for c in cells}
    assert sweeps.table(out) == sweeps.table(clean)
