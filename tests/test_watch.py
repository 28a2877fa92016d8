"""`bbt watch` on a finished run, on a run still going (it returns when the run ends), on a run
killed midway (it says so and returns), on a sweep; and `--report-to tensorboard`."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest

from bbt import watch
from bbt.cli import main
from bbt.errors import ConfigError
from serverproc import REPO


def _tune_args(model, data_dir, out, budget="8", *extra):
    return ["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
            "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", budget,
            "--out", str(out), "--no-cache", "--quiet", *extra]


def test_sparkline_follows_the_values():
    line = watch.sparkline([3, 2, 1])
    assert line[0] == "█" and line[-1] == "▁" and len(line) == 3
    assert watch.sparkline([]) == "" and len(watch.sparkline(list(range(100)), width=10)) == 10


def test_once_on_a_finished_run_shows_its_scores(tiny_encoder, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tune_args(tiny_encoder, data_dir, out)) == 0
    capsys.readouterr()
    assert main(["watch", str(out), "--once"]) == 0
    text = capsys.readouterr().out
    assert "· done" in text and "no prompt" in text and "/ 8" in text
    snap = watch.run_snapshot(out)
    assert snap["status"] == "done" and snap["queries_used"] <= 8 and len(snap["loss"]) == snap["steps"]


def test_watch_follows_a_running_tune_and_returns_when_it_ends(tiny_encoder, data_dir, tmp_path):
    out = tmp_path / "run"
    tune = subprocess.Popen([sys.executable, "-m", "bbt.cli", *_tune_args(tiny_encoder, data_dir, out, "400")], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        view = subprocess.run([sys.executable, "-m", "bbt.cli", "watch", str(out), "--interval", "0.2"], cwd=REPO,
                              capture_output=True, text=True, timeout=300)
        assert tune.poll() is not None or (out / "metrics.json").exists()  # it returned because the run ended
    finally:
        tune.wait(timeout=300)
    assert view.returncode == 0, view.stderr
    assert "queries" in view.stdout and "done" in view.stdout
    assert (out / "metrics.json").exists()


def test_watch_returns_when_the_run_is_killed_and_says_how_to_go_on(tiny_encoder, data_dir, tmp_path):
    out = tmp_path / "run"
    tune = subprocess.Popen([sys.executable, "-m", "bbt.cli", *_tune_args(tiny_encoder, data_dir, out, "4000")],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not ((out / "log.jsonl").exists() and (out / "log.jsonl").stat().st_size) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert watch.run_snapshot(out)["status"] == "running" and (out / "running.json").exists()
    finally:
        tune.send_signal(signal.SIGKILL)  # no finally block of bbt's runs: running.json stays, naming a dead pid
        tune.wait(timeout=60)
    assert (out / "running.json").exists() and not (out / "metrics.json").exists()
    view = subprocess.run([sys.executable, "-m", "bbt.cli", "watch", str(out), "--interval", "0.2"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert view.returncode == 1 and "stopped before it ended" in view.stderr and f"--resume {out}" in view.stderr
    assert watch.run_snapshot(out)["status"] == "stopped"


def test_a_run_that_is_starting_is_waited_for_not_refused(tmp_path):
    """A run names its process (running.json) before it writes config.json: a watcher that looks
    in between sees a run starting, not a folder of something else."""
    from bbt import rundir

    out = tmp_path / "run"
    out.mkdir()
    with rundir.running(out):
        assert watch.folder_kind(out) is None
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not a run or sweep folder"):
        watch.folder_kind(out)


def test_once_on_a_sweep_lists_its_cells(tiny_encoder, data_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("BBT_CACHE", "off")
    out = tmp_path / "S"
    assert main(["sweep", "--tasks", data_dir.name, "--data-root", str(data_dir.parent), "--seeds", "13", "42",
                 "--budgets", "8", "--model", str(tiny_encoder), "--prompt-length", "4", "--set", "intrinsic_dim=8",
                 "popsize=4", "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["watch", str(out), "--once"]) == 0
    text = capsys.readouterr().out
    assert "2/2 cells done" in text and f"{data_dir.name}-s13-bbt" in text


def test_report_to_tensorboard_writes_event_files(tiny_encoder, data_dir, tmp_path):
    out = tmp_path / "run"
    assert main(_tune_args(tiny_encoder, data_dir, out, "8", "--report-to", "tensorboard")) == 0
    events = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert events and b"tuning/loss_min" in events[0].read_bytes()
