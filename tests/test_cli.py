"""The `bbt` command: help (every option the docs document for `bbt tune` included), the settings it
builds, a whole tune -> evaluate -> predict round on a tiny model, and errors as one clean line; and
`bbt evaluate` on a run tuned through a server, which asks that server (--in-process: the model
here), with a progress bar for each scoring pass (--quiet: none).

The models are the tiny ones of tests/conftest.py; the server is the real app on a loopback port in
a thread (tests/appserver.py).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from appserver import serving
from bbt.cli import build_parser, main
from bbt.config import TuneConfig
from conftest import write_jsonl
from serverproc import REPO, free_port


SUBCOMMANDS = ["tune", "evaluate", "predict", "serve", "demo"]
METRIC_KEYS = {"train_acc", "dev_acc", "test_acc", "zero_prompt_test_acc", "no_prompt_test_acc", "queries_used", "tuning_seconds", "wall_seconds"}


def bbt(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The installed console script when there is one, else `python -m bbt.cli`."""
    script = Path(sys.executable).parent / "bbt"
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "bbt.cli"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*cmd, *args], capture_output=True, text=True, timeout=timeout, env=env)


def test_help_from_the_shell():
    out = bbt("--help")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage: bbt")
    for name in SUBCOMMANDS:
        assert name in out.stdout
    assert "bbt tune --task sst2" in out.stdout  # the examples epilog


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: bbt {command}")


DOCS = REPO / "docs"
OPTION = re.compile(r"--[a-z0-9][a-z0-9-]*")


def _documented_tune_options() -> set[str]:
    """Every option the docs document for `bbt tune`: the flag column of the option tables of the
    tuning page (docs/tuning.md, "The main options") and of the budget limits it sends the reader to
    (docs/budgets.md, "Limits"), and every option that a `bbt tune` command in a docs page gives
    (--task, --data, --out, --resume, --endpoint... have no table row; the pages show them in
    commands). Options named only in the prose are left out: the prose does not say which command
    takes them (tuning.md names `bbt sweep --budgets`)."""
    options = set()
    for page in ("tuning.md", "budgets.md"):
        for line in (DOCS / page).read_text(encoding="utf-8").splitlines():
            if line.startswith("| `--"):  # a table row whose flag cell starts with an option
                options |= set(OPTION.findall(line.split(" | ")[0]))
    for page in sorted(DOCS.glob("*.md")):
        text = re.sub(r"\\\n\s*", " ", page.read_text(encoding="utf-8"))  # shell continuation lines joined
        for command in re.finditer(r"bbt tune((?: +[^\s`|;&#<>]+)*)", text):  # up to a code span's or command's end
            options |= set(OPTION.findall(command.group(1)))
    return options


def test_tune_help_shows_every_documented_option(capsys):
    documented = _documented_tune_options()
    # the tables and commands were found: they hold the options this test once listed by hand, and more
    assert {"--task", "--data", "--seed", "--budget", "--out", "--method", "--model", "--endpoint", "--prompt-length",
            "--intrinsic-dim", "--popsize", "--sigma", "--loss"} <= documented
    assert len(documented) >= 40, sorted(documented)
    with pytest.raises(SystemExit):
        main(["tune", "--help"])
    # the options help defines, one per line at the left ("  --seed SEED ...", "  -h, --help"), not those
    # an option's description mentions
    shown = set(re.findall(r"^  (?:-\w, )?(--[a-z0-9][a-z0-9-]*)", capsys.readouterr().out, re.M))
    missing = sorted(documented - shown)
    assert not missing, f"documented for bbt tune but missing from bbt tune --help: {missing}"


def test_every_tune_option_has_a_row_in_the_docs():
    """The other way round: an option `bbt tune --help` gives (generated from TuneConfig or not) is
    in an option table of the docs, not only in prose."""
    tune = build_parser()._subparsers._group_actions[0].choices["tune"]
    options = {o for action in tune._actions for o in action.option_strings if o.startswith("--") and o != "--help"}
    rows = set()
    for page in DOCS.glob("*.md"):
        for line in page.read_text(encoding="utf-8").splitlines():
            if line.startswith("| `--"):
                rows |= set(OPTION.findall(line.split(" | ")[0]))
    assert not options - rows, f"bbt tune options with no row in a docs table: {sorted(options - rows)}"


def test_no_command_prints_help_and_fails(capsys):
    assert main([]) == 2
    assert "usage: bbt" in capsys.readouterr().out


def test_version(capsys):
    from bbt import __version__

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0 and __version__ in capsys.readouterr().out


def test_parser_defaults_come_from_tuneconfig():
    args = build_parser().parse_args(["tune", "--data", "d", "--out", "o"])
    d = TuneConfig()
    assert (args.intrinsic_dim, args.popsize, args.sigma, args.budget, args.model) == (
        d.intrinsic_dim, d.popsize, d.sigma, d.budget.queries, d.model)
    # settings with a family default are left unset, so the model's family decides (a given one wins)
    assert (args.method, args.prompt_length, args.alpha, args.init) == (None, None, None, None)


def test_tune_flags_reach_the_config():
    from bbt.cli import _tune_config

    cfg = _tune_config(build_parser().parse_args(["tune", "--data", "d", "--out", "o", "--folds", "2",
                                                  "--select", "dev-loss"]))
    assert (cfg.folds, cfg.select, cfg.local) == (2, "dev-loss", "none")
    cfg = _tune_config(build_parser().parse_args(["tune", "--data", "d", "--out", "o", "--local-dim", "5"]))
    assert (cfg.folds, cfg.local, cfg.local_dim) == (1, "cobyla", 5)  # a stage-two setting turns the stage on


def test_family_defaults_fill_only_what_was_not_given():
    from bbt.config import with_family_defaults

    cfg = with_family_defaults(TuneConfig(prompt_length=20), "causal")
    assert (cfg.method, cfg.prompt_length, cfg.init, cfg.alpha) == ("bbtv2", 20, "instruction", 0.5)
    assert with_family_defaults(TuneConfig(method="bbt"), "causal").method == "bbt"
    # a second search stage is BBT's, so asking for one keeps BBT on a causal LM
    assert with_family_defaults(TuneConfig(local="cobyla", budget={"queries": 100}), "causal").method == "bbt"
    assert with_family_defaults(TuneConfig(), "encoder") == TuneConfig()  # the sentence encoder keeps bbt's defaults
    given = with_family_defaults(TuneConfig(init="zero", alpha=1.0, prompt_length=50), "causal")
    assert (given.prompt_length, given.init, given.alpha) == (50, "zero", 1.0)
    assert with_family_defaults(TuneConfig(init="instruction", init_text="Say it."), "causal").init_text == "Say it."
    # a config read back from a run folder names every field: nothing changes on resume
    saved = TuneConfig.model_validate(TuneConfig().model_dump())
    assert with_family_defaults(saved, "causal") == saved


def _config_of_tune(argv: list[str], monkeypatch) -> TuneConfig:
    """The TuneConfig `bbt tune ARGV` builds, stopped before a backend opens (no model loads)."""
    from bbt import cli
    from bbt.errors import ConfigError

    seen = []
    build = cli._tune_config
    monkeypatch.setattr(cli, "_tune_config", lambda args: seen.append(build(args)) or seen[-1])

    def no_backend(*args, **kwargs):
        raise ConfigError("stopped before the model loads")

    monkeypatch.setattr(cli, "make_backend", no_backend)
    assert main(argv) == 1
    (cfg,) = seen
    return cfg


def test_without_model_tune_runs_exactly_what_model_smollm2_runs(data_dir, tmp_path, monkeypatch, capsys):
    """The default model is SmolLM2, where tuning pays: no --model gives the very config --model smollm2
    gives, so the same causal-LM defaults (BBTv2, L = 10, ...) follow; MiniLM is one flag away."""
    from bbt.config import DEFAULT_MODEL, with_family_defaults
    from bbt.errors import ModelNotFound

    base = ["tune", "--task", "sst2", "--data", str(data_dir), "--budget", "40", "--no-cache", "--out", str(tmp_path / "r")]
    default = _config_of_tune(base, monkeypatch)
    named = _config_of_tune([*base, "--model", "smollm2"], monkeypatch)
    assert DEFAULT_MODEL == TuneConfig().model == default.model == "smollm2"
    assert default == named and default.model_fields_set == named.model_fields_set
    minilm = _config_of_tune([*base, "--model", "minilm"], monkeypatch)
    assert minilm == default.model_copy(update={"model": "minilm"})
    assert "stopped before the model loads" in capsys.readouterr().err

    from servers.loading import detect_family, resolve_model_path  # reads a file name or config.json, loads nothing

    try:
        family, minilm_family = (detect_family(resolve_model_path(m)) for m in ("smollm2", "minilm"))
    except ModelNotFound as exc:
        pytest.skip(f"a bundled model is not installed: {exc}")
    tuned = with_family_defaults(default, family)  # what run_tune and --dry-run apply
    assert tuned == with_family_defaults(named, family)
    assert (family, tuned.method, tuned.prompt_length, tuned.init, tuned.alpha) == ("causal", "bbtv2", 10, "instruction", 0.5)
    kept = with_family_defaults(minilm, minilm_family)
    assert (minilm_family, kept.method, kept.prompt_length, kept.init, kept.alpha) == ("encoder", "bbt", 50, "zero", 1.0)


def test_serve_without_model_serves_the_default_model(monkeypatch):
    app = pytest.importorskip("servers.app", reason="bbt serve needs the server extra")
    served = []
    monkeypatch.setattr(app, "serve", lambda models, **kwargs: served.append(models))
    assert main(["serve"]) == 0 and main(["serve", "--model", "minilm"]) == 0
    assert served == [["smollm2"], ["minilm"]]


def test_help_says_which_model_suits_what(capsys):
    for command in ("tune", "serve", "sweep"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        text = " ".join(capsys.readouterr().out.split()).replace("- ", "-")  # argparse wraps at hyphens
        assert "smollm2 (the default; SmolLM2-135M-Instruct, a 135M causal LM, where tuning gains most" in text, command
        assert "minilm (all-MiniLM-L6-v2, a small sentence encoder: fast, with less to gain from tuning" in text, command


# ---- a whole run on a tiny model ------------------------------------------------------------

BUDGET = 45


@pytest.fixture(scope="module", params=["bbt", "bbtv2"])
def tiny_run(request, tmp_path_factory, tiny_encoder, data_dir):
    """A run folder of each method (BBTv2: both layers of the tiny encoder prompted)."""
    out = tmp_path_factory.mktemp("runs") / f"tiny-{request.param}"
    code = main(["tune", "--task", "sst2", "--data", str(data_dir), "--seed", "42", "--budget", str(BUDGET),
                 "--out", str(out), "--model", str(tiny_encoder), "--prompt-length", "4", "--intrinsic-dim", "16",
                 "--popsize", "8", "--method", request.param, "--quiet"])
    assert code == 0
    return out


def test_tune_writes_the_run_folder(tiny_run, tiny_encoder, data_dir):
    assert {p.name for p in tiny_run.iterdir()} >= {"config.json", "log.jsonl", "prompt.json", "metrics.json"}
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert METRIC_KEYS <= set(metrics)
    for key in ("train_acc", "dev_acc", "test_acc", "zero_prompt_test_acc", "no_prompt_test_acc"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert 0 < metrics["queries_used"] <= BUDGET
    assert 0 < metrics["tuning_seconds"] <= metrics["wall_seconds"]
    assert metrics["test_split"] == "test"
    spending = metrics["spending"]
    assert spending["tuning"]["queries"] == metrics["queries_used"]
    assert spending["usage_mismatches"] == []
    # no prompt, zero prompt (z = 0) and tuned prompt on the 12 test examples, and the plain model through the
    # words the default --verbalizer auto chose where they are not the task's own, then the plain model on the
    # 8 dev examples: reported, not charged to the budget
    passes = 3 + (metrics["verbalizer"]["label_words"] > 1)
    assert spending["evaluation"]["queries"] == passes + 1 and spending["evaluation"]["examples"] == 12 * passes + 8
    assert json.loads((tiny_run / "config.json").read_text())["config"]["verbalizer"] == "auto"
    assert "test_f1" not in metrics  # sst2 is scored by accuracy
    log = [json.loads(line) for line in (tiny_run / "log.jsonl").read_text().splitlines()]
    assert len(log) == metrics["generations"] >= 2
    assert log[-1]["queries_used"] == metrics["queries_used"]
    config = json.loads((tiny_run / "config.json").read_text())
    assert config["config"]["model"] == str(tiny_encoder)
    assert config["config"]["budget"]["queries"] == BUDGET
    assert config["task"]["name"] == "sst2"
    assert Path(config["data"]) == data_dir.resolve()
    prompt = json.loads((tiny_run / "prompt.json").read_text())
    layers = 1 if config["config"]["method"] == "bbt" else 2
    assert prompt["version"] == 1 and prompt["method"] == config["config"]["method"] and prompt["prompt_length"] == 4
    assert len(prompt["z"]) == layers and all(len(z) == 16 for z in prompt["z"])
    assert [spec["D"] for spec in prompt["projections"]] == [4 * 32] * layers
    assert len({spec["seed"] for spec in prompt["projections"]}) == layers  # each layer its own A_l


def test_evaluate_reproduces_the_run_metrics(tiny_run, capsys):
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert main(["evaluate", "--run", str(tiny_run)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and result["examples"] == 12
    assert result["acc"] == pytest.approx(metrics["test_acc"])
    assert result["loss"] == pytest.approx(metrics["test_loss"], rel=1e-4)
    assert result["zero_prompt_acc"] == pytest.approx(metrics["zero_prompt_test_acc"])
    assert result["no_prompt_acc"] == pytest.approx(metrics["no_prompt_test_acc"])
    assert main(["evaluate", "--run", str(tiny_run), "--split", "train"]) == 0
    train = json.loads(capsys.readouterr().out)
    assert train["split"] == "train" and train["examples"] == 8
    assert train["acc"] == pytest.approx(metrics["train_acc"])
    assert train["loss"] == pytest.approx(metrics["train_loss"], rel=1e-4)


def test_predict_labels_texts(tiny_run, capsys):
    texts = ["the film was great and good", "the story was awful and dull", "nice"]
    assert main(["predict", "--run", str(tiny_run), *texts]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == texts
    for x in lines:
        assert x["label"] in ("negative", "positive")
        assert set(x["probs"]) == {"negative", "positive"}
        assert sum(x["probs"].values()) == pytest.approx(1.0, abs=1e-3)
        assert x["label"] == max(x["probs"], key=x["probs"].get)


def test_predict_agrees_with_evaluate(tiny_run, capsys, data_dir):
    """The labels predict prints give the accuracy evaluate reports on the same texts."""
    from bbt.data import load_file
    from bbt.tasks import BUILTIN_TASKS

    test = load_file(data_dir / "test.jsonl", BUILTIN_TASKS["sst2"])
    assert main(["predict", "--run", str(tiny_run), *[e.text for e in test.examples]]) == 0
    labels = [json.loads(line)["label"] for line in capsys.readouterr().out.splitlines()]
    acc = sum(lab == ["negative", "positive"][y] for lab, y in zip(labels, test.labels)) / len(test)
    metrics = json.loads((tiny_run / "metrics.json").read_text())
    assert acc == pytest.approx(metrics["test_acc"])


# ---- errors are one clean line and exit code 1 ----------------------------------------------

def _assert_clean_error(out: subprocess.CompletedProcess, *needles: str) -> None:
    assert out.returncode == 1, (out.returncode, out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("bbt "), out.stderr
    for needle in needles:
        assert needle in out.stderr, out.stderr


def test_unknown_task(data_dir, tmp_path):
    out = bbt("tune", "--task", "nosuch", "--data", str(data_dir), "--out", str(tmp_path / "r"))
    _assert_clean_error(out, "unknown task 'nosuch'", "sst2")


def test_missing_data_folder(tmp_path):
    out = bbt("tune", "--task", "sst2", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "r"))
    _assert_clean_error(out, "data folder not found", str(tmp_path / "nowhere"))


def test_malformed_jsonl_line_names_file_and_line(tmp_path, data_dir):
    folder = tmp_path / "broken"
    shutil.copytree(data_dir, folder)
    train = folder / "16shot" / "seed42" / "train.jsonl"
    lines = train.read_text().splitlines()
    lines[2] = '{"text": "cut off in the mid'
    train.write_text("\n".join(lines) + "\n")
    out = bbt("tune", "--data", str(folder), "--out", str(tmp_path / "r"))
    _assert_clean_error(out, f"{train}:3:", "not valid JSON")


def test_bad_option_values_are_clean_errors(tmp_path, data_dir):
    out = bbt("tune", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--popsize", "2")
    _assert_clean_error(out, "--popsize 2", "greater than or equal to 3")
    out = bbt("tune", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--budget", "0")
    _assert_clean_error(out, "--budget 0")
    out = bbt("tune", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--patience", "0")
    _assert_clean_error(out, "--patience 0", "greater than or equal to 1")


def test_unknown_model_and_missing_run_folder(tmp_path, data_dir, capsys):
    assert main(["tune", "--data", str(data_dir), "--out", str(tmp_path / "r"), "--model", str(tmp_path / "no-model"),
                 "--quiet"]) == 1
    assert "unknown model" in capsys.readouterr().err
    for command in (["evaluate", "--run", str(tmp_path / "none")], ["predict", "--run", str(tmp_path / "none"), "hi"]):
        assert main(command) == 1
        err = capsys.readouterr().err
        assert "is not a run folder" in err and "prompt.json" in err


def test_a_bad_row_in_the_test_set_is_found_before_any_model_runs(tmp_path, data_dir):
    folder = tmp_path / "badtest"
    shutil.copytree(data_dir, folder)
    write_jsonl(folder / "test.jsonl", [{"text": "fine", "label": 0}, {"text": "fine", "label": 5}])
    out = bbt("tune", "--data", str(folder), "--out", str(tmp_path / "r"), "--model", str(tmp_path / "no-model"))
    _assert_clean_error(out, f"{folder / 'test.jsonl'}:2:", "label 5 outside 0..1")


def test_predict_pairs(tmp_path, tiny_bert_mlm, capsys):
    """A pair task's texts are given as 'TEXT ||| PAIR'; a text without its pair is a clean error."""
    import numpy as np

    from bbt.projection import normal_spec
    from bbt.rundir import PromptArtifact
    from bbt.tasks import BUILTIN_TASKS

    z = np.random.default_rng(0).standard_normal((1, 8))
    art = PromptArtifact(method="bbt", model=str(tiny_bert_mlm), task=BUILTIN_TASKS["rte"], prompt_length=3,
                         z=z.tolist(), projections=[normal_spec(seed=1, d=8, D=3 * 32, target_std=0.5)])
    (tmp_path / "prompt.json").write_text(art.model_dump_json())
    assert main(["predict", "--run", str(tmp_path), "the cat sat ||| a cat sat", "it rained ||| it was dry"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["the cat sat ||| a cat sat", "it rained ||| it was dry"]
    assert all(x["label"] in ("entailment", "not_entailment") for x in lines)
    assert lines[0]["probs"] != lines[1]["probs"]
    assert main(["predict", "--run", str(tmp_path), "no pair here"]) == 1
    assert "TEXT ||| PAIR" in capsys.readouterr().err


# ---- bbt evaluate on a run tuned through a server; its progress bars ------------------------

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
