"""What a new user meets in the first hour of the command line: a wrong --endpoint fails fast and
once, every long phase shows progress (and --quiet hides all of it), --test-limit and the dry run's
time estimate, `bbt predict` from stdin and on a run tuned through a server, `bbt watch` on a
folder that is not a run, --help that says each default once, and what `bbt export` writes.

Everything runs on the tiny encoder (tests/conftest.py) and a closed loopback port: no server starts.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from bbt import rundir, watch
from bbt.cli import _Help, build_parser, main
from serverproc import REPO, free_port


def _tune(model, data_dir, out, *extra: str) -> list[str]:
    return ["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
            "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "8", "--verbalizer", "manual",
            "--out", str(out), "--no-cache", *extra]


@pytest.fixture(scope="module")
def run(tiny_encoder, data_dir, tmp_path_factory):
    """A finished run of the tiny encoder, tuned in process."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(_tune(tiny_encoder, data_dir, out, "--quiet")) == 0
    return out


# ---- a wrong --endpoint ---------------------------------------------------------------------------

def test_a_closed_port_fails_fast_with_one_message(tiny_encoder, data_dir, tmp_path, capsys, caplog):
    out = tmp_path / "run"
    start = time.monotonic()
    code = main(_tune("minilm", data_dir, out, "--endpoint", f"http://127.0.0.1:{free_port()}"))
    assert time.monotonic() - start < 30  # the 10 s of a first contact, not --wait's 300
    assert code == 1
    err = capsys.readouterr().err
    assert "nothing answers at http://127.0.0.1:" in err and "check the address" in err
    assert [r for r in caplog.records if r.levelname == "WARNING"] == []  # no line per retry: the error says it
    assert not out.exists()


def test_a_resumed_run_gives_its_server_the_whole_wait(run, tmp_path, monkeypatch):
    """A run folder says its server answered before: --resume waits --wait for it from the first
    request (a server restarting), where a new address gets 10 s."""
    from bbt import cli

    args = build_parser().parse_args(["tune", "--endpoint", f"http://127.0.0.1:{free_port()}", "--wait", "120"])
    with cli.make_backend(args) as fresh, cli.make_backend(args, answered_before=True) as known:
        assert (fresh.first_contact_wait, known.first_contact_wait) == (10, 120)
    remote = tmp_path / "remote"
    shutil.copytree(run, remote)
    (remote / "metrics.json").unlink()
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "endpoint": [args.endpoint[0]]}))
    seen = {}

    def spy(args, **kw):
        seen.update(kw, endpoint=args.endpoint)
        raise cli.ConfigError("stop here")

    monkeypatch.setattr(cli, "make_backend", spy)
    assert main(["tune", "--resume", str(remote)]) == 1
    assert seen == {"answered_before": True, "endpoint": args.endpoint}


# ---- progress on every long phase, and none with --quiet ----------------------------------------------

def test_every_scoring_pass_shows_progress(tiny_encoder, data_dir, tmp_path, capsys):
    assert main(_tune(tiny_encoder, data_dir, tmp_path / "run")) == 0
    err = capsys.readouterr().err
    for phase in ("scoring test: no prompt", "tuning", "scoring test: z = 0, tuned"):
        assert phase in err, phase


def test_quiet_hides_every_bar_the_model_loading_one_too(tiny_encoder, data_dir, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
    out = subprocess.run([sys.executable, "-m", "bbt.cli", *_tune(tiny_encoder, data_dir, tmp_path / "run", "--quiet")],
                         cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "Loading weights" not in out.stderr and "it/s" not in out.stderr and "%|" not in out.stderr, out.stderr
    assert "tuned test accuracy" in out.stdout


def test_test_limit_scores_a_sample_and_the_run_keeps_it(tiny_encoder, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tune(tiny_encoder, data_dir, out, "--quiet", "--test-limit", "5")) == 0
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    scored = [r["examples"] for r in ledger if r["purpose"] == "evaluation"]
    assert scored.count(5) == 3 and 12 not in scored  # no prompt, z = 0 and tuned: 5 of the 12 test examples
    assert json.loads((out / "config.json").read_text())["test_limit"] == 5  # what --resume reads back
    capsys.readouterr()
    assert main(["tune", "--resume", str(out), "--test-limit", "7"]) == 1
    assert "drop --test-limit" in capsys.readouterr().err
    assert main(_tune(tiny_encoder, data_dir, tmp_path / "bad", "--test-limit", "-1")) == 1
    assert "--test-limit -1" in capsys.readouterr().err


def test_dry_run_says_how_long_the_run_takes(tiny_encoder, data_dir, tmp_path, capsys):
    assert main(_tune(tiny_encoder, data_dir, tmp_path / "run", "--dry-run")) == 0
    text = capsys.readouterr().out
    line = next(x for x in text.splitlines() if x.startswith("time, roughly: "))
    assert "tuning" in line and "scoring the 12 test examples" in line and "s per request" in line
    assert not (tmp_path / "run").exists()


def test_help_says_how_long_the_default_budget_takes():
    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    budget = next(a for a in tune._actions if "--budget" in a.option_strings)
    help_text = _Help("tune")._expand_help(budget)  # unwrapped: argparse may break a line inside --dry-run
    assert "(default: 8000)" in help_text and "hours" in help_text and "--dry-run estimates the time" in help_text


# ---- bbt predict ---------------------------------------------------------------------------------

def test_predict_reads_texts_from_stdin(run, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("the film was great and good\nthe story was awful and dull\n"))
    assert main(["predict", str(run), "-"]) == 0  # the run as first argument, the texts from stdin
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == ["the film was great and good", "the story was awful and dull"]
    assert all(r["label"] in ("negative", "positive") for r in rows)


@pytest.mark.parametrize("texts", [[""], ["fine", "   "]])
def test_predict_refuses_an_empty_text(run, capsys, texts):
    assert main(["predict", "--run", str(run), *texts]) == 1
    assert f"text {len(texts)}: 'text' is missing or empty" in capsys.readouterr().err


def test_predict_on_a_run_tuned_through_a_server_asks_that_server(run, tmp_path, capsys):
    remote = tmp_path / "remote"
    shutil.copytree(run, remote)
    config = json.loads((remote / "config.json").read_text())
    url = f"http://127.0.0.1:{free_port()}"  # the server it was tuned through, gone
    (remote / "config.json").write_text(json.dumps({**config, "endpoint": [url]}))
    assert main(["predict", "--run", str(remote), "--wait", "0.5", "a fine film"]) == 1
    err = capsys.readouterr().err
    assert f"was tuned through {url}" in err and f"nothing answers at {url}" in err  # not loaded in process
    assert main(["predict", "--run", str(remote), "--in-process", "a fine film"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == "a fine film"


# ---- bbt watch -------------------------------------------------------------------------------------

def test_watch_refuses_a_folder_that_is_not_a_run(run, tmp_path, capsys):
    start = time.monotonic()
    assert main(["watch", str(run.parent / (run.name + "x")), "--wait", "0.5"]) == 1
    assert time.monotonic() - start < 10
    assert f"did you mean {run}?" in capsys.readouterr().err
    assert main(["watch", str(run.parent / "typo"), "--once"]) == 1
    assert "does not exist" in capsys.readouterr().err
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("x")
    assert main(["watch", str(tmp_path / "notes")]) == 1  # at once: it holds something else
    assert "not a run or sweep folder" in capsys.readouterr().err


def test_watch_shows_when_tuning_ends(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"config": {"method": "bbt", "model": "m", "budget": {"queries": 100}},
                                                 "task": {"name": "t"}}))
    (run / "log.jsonl").write_text(json.dumps({"queries_used": 20, "seconds": 10.0, "loss_min": 0.7}) + "\n")
    with rundir.running(run):  # a run in progress: running.json names its (this) process
        snap = watch.run_snapshot(run)
        assert snap["eta"] == pytest.approx(40.0)  # 80 queries left at 2 per second
        watch.watch(run, once=True)
    assert "ETA" in capsys.readouterr().out and "0:40" in watch._clock(snap["eta"])
    assert watch.run_snapshot(run)["status"] == "stopped" and watch.run_snapshot(run)["eta"] is None  # no one tunes it


# ---- --help ---------------------------------------------------------------------------------------------

def test_help_says_each_default_once_and_explains_its_words(monkeypatch):
    monkeypatch.setenv("BBT_API_KEY", "secret-key-0123456789")  # bbt sweep's --api-key defaults to it
    parser = build_parser()
    assert "secret-key" not in parser._subparsers._group_actions[0].choices["sweep"].format_help()
    for name, sub in parser._subparsers._group_actions[0].choices.items():
        for action in sub._actions:
            if not action.help:
                continue
            text = _Help(name)._expand_help(action)
            where = f"bbt {name} {'/'.join(action.option_strings) or action.dest}: {text}"
            assert "(default: None)" not in text, where
            assert len(re.findall(r"\(default|default:", text, re.IGNORECASE)) <= 1, where
    tune = " ".join(parser._subparsers._group_actions[0].choices["tune"].format_help().split())
    assert "held-out train folds" not in tune
    assert "p0 (the soft prompt the search starts from)" in tune
    assert "size of z, the small vector CMA-ES searches" in tune and "intrinsic sends z" in tune


# ---- bbt export ---------------------------------------------------------------------------------------

def test_export_says_what_works_and_writes_readable_files(run, tmp_path, capsys):
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "peft")]) == 1  # a [CLS] model: no PEFT
    assert "--format bbt" in capsys.readouterr().err
    assert main(["export", "--run", str(run), "--format", "bbt", "--out", str(tmp_path / "bbt")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    for path in [*(tmp_path / "bbt").iterdir(), run / "prompt.safetensors"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask, path
