"""`bbt evaluate` on a run tuned through a server asks that server (--in-process: the model here),
and shows a progress bar for each scoring pass (--quiet: none).

Everything runs on the tiny encoder (tests/conftest.py); the server is the real app on a loopback
port in a thread (tests/appserver.py).
"""

from __future__ import annotations

import json
import shutil

import pytest

from appserver import serving
from bbt.cli import main
from serverproc import free_port


@pytest.fixture(scope="module")
def run(tiny_encoder, data_dir, tmp_path_factory):
    """A finished run of the tiny encoder, tuned in process."""
    out = tmp_path_factory.mktemp("runs") / "run"
    assert main(["tune", "--model", str(tiny_encoder), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
                 "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "8",
                 "--verbalizer", "manual", "--out", str(out), "--no-cache", "--quiet"]) == 0
    return out


def _tuned_through(run, tmp_path, url: str):
    """A copy of `run` whose config.json says it was tuned through `url`."""
    remote = tmp_path / "remote"
    shutil.copytree(run, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "endpoint": [url]}))
    return remote


def test_evaluate_shows_a_bar_for_each_scoring_pass(run, capsys):
    assert main(["evaluate", "--run", str(run)]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["examples"] == 12
    for phase in ("scoring test: no prompt", "scoring test: tuned, z = 0"):
        assert phase in err, phase
    assert main(["evaluate", "--run", str(run), "--run", str(run), "--split", "dev"]) == 0  # an ensemble of two
    assert "scoring dev: 2 members" in capsys.readouterr().err


def test_evaluate_quiet_shows_no_bar(run, capsys):
    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    out, err = capsys.readouterr()
    assert "acc" in json.loads(out)
    assert "scoring" not in err and "%|" not in err


def test_evaluate_on_a_run_tuned_through_a_server_asks_that_server(run, tmp_path, capsys, tiny_encoder, monkeypatch):
    from bbt.backends import local
    from servers.app import create_app
    from servers.service import ModelService

    assert main(["evaluate", "--run", str(run), "--quiet"]) == 0
    here = json.loads(capsys.readouterr().out)
    with serving(create_app(ModelService([str(tiny_encoder)], lazy=False))) as url:
        remote = _tuned_through(run, tmp_path, url)
        with monkeypatch.context() as m:  # no model in this process: the server scores it
            m.setattr(local, "LocalBackend", lambda *a, **kw: pytest.fail("loaded the model in process"))
            assert main(["evaluate", "--run", str(remote), "--quiet"]) == 0
        out, err = capsys.readouterr()
    assert f"bbt evaluate: {remote} was tuned through {url}" in err
    there = json.loads(out)
    assert there["acc"] == pytest.approx(here["acc"]) and there["no_prompt_acc"] == pytest.approx(here["no_prompt_acc"])


def test_evaluate_in_process_skips_the_server_a_run_names(run, tmp_path, capsys):
    url = f"http://127.0.0.1:{free_port()}"  # the server it was tuned through, gone
    remote = _tuned_through(run, tmp_path, url)
    assert main(["evaluate", "--run", str(remote), "--wait", "0.5", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert f"was tuned through {url}" in err and f"nothing answers at {url}" in err  # not loaded in process
    assert main(["evaluate", "--run", str(remote), "--in-process", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 12
    assert main(["evaluate", "--run", str(remote), "--in-process", "--endpoint", url]) == 1
    assert "give one of them" in capsys.readouterr().err
