"""A user's own task folder and the run folders `bbt tune` leaves behind (issue 39).

Own train/dev files used as given; bad files and rows refused with file and line (or skipped on
request); inputs checked before any model loads; no half-written run folder and no resume advice
where nothing was spent; budgets too small for one generation refused; strict JSON; a word when
the tuned prompt is below the plain model.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from bbt.cli import main
from bbt.data import MAX_TEXT_CHARS, load_task_folder
from bbt.errors import BackendError, DataError
from bbt.protocol import TaskSpec
from conftest import sentiment_sentences, write_jsonl

PETS = TaskSpec(name="pets", labels=["cat", "dog"], template="{text} . It was {mask} .", verbalizer=["cat", "dog"],
                label_texts=["It is about a cat.", "It is about a dog."])
NO_MODEL = "/nonexistent/model-dir"  # a model that cannot load: an error that names it means the model came first


def _pets(folder: Path, *, train: int = 8, dev: int | None = 3, test: int = 4) -> Path:
    """A user's own task folder: task.json with two labels, train.jsonl, dev.jsonl and test.jsonl at the top."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "task.json").write_text(json.dumps({"name": "pets", "labels": ["negative", "positive"], "pair": False}))
    write_jsonl(folder / "train.jsonl", sentiment_sentences(1, train))
    if dev is not None:
        write_jsonl(folder / "dev.jsonl", sentiment_sentences(2, dev))
    write_jsonl(folder / "test.jsonl", sentiment_sentences(3, test))
    return folder


def _tune(data: Path, out: Path, *extra: str) -> list[str]:
    return ["tune", "--data", str(data), "--out", str(out), "--quiet", "--no-cache", *extra]


def _small(model: Path) -> list[str]:
    return ["--model", str(model), "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4"]


def _strict(path: Path):
    """JSON as a strict parser reads it: Infinity and NaN are refused."""
    def refuse(name):
        raise ValueError(f"{path}: {name} is not JSON")
    return json.loads(path.read_text(), parse_constant=refuse)


# ---- 1. own fixed splits used as given ------------------------------------------------------

def test_own_train_and_dev_files_are_used_as_given(tmp_path, sst2_task):
    data = load_task_folder(_pets(tmp_path / "pets"), sst2_task, seed=42)
    assert (len(data.train), len(data.dev), len(data.test)) == (16, 6, 8)
    assert any("as given in train.jsonl and dev.jsonl" in n for n in data.notes)
    assert load_task_folder(tmp_path / "pets", sst2_task, seed=7, k=4).dev == data.dev  # no draw: seed and k-shot aside


def test_a_tune_with_own_splits_scores_dev_on_the_files_lines(tiny_encoder, tmp_path, capsys):
    """The issue's check: budget 40, prompt length 10, no other option (but the tiny model, in tests)."""
    folder, out = _pets(tmp_path / "pets"), tmp_path / "run"
    assert main(["tune", "--data", str(folder), "--budget", "40", "--prompt-length", "10", "--out", str(out),
                 "--model", str(tiny_encoder), "--quiet", "--no-cache"]) == 0
    assert "train and dev as given" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert round(metrics["dev_acc"] * 6, 6).is_integer()
    ledger = [json.loads(line) for line in (out / "ledger.jsonl").read_text().splitlines()]
    dev_checks = [e for e in ledger if e["purpose"] == "tuning" and e["queries"] == 1 and e["examples"] == 6]
    assert dev_checks, "no dev query scored the file's 6 lines"
    assert all(e["examples"] % 16 == 0 for e in ledger if e["purpose"] == "tuning" and e["queries"] > 1)


def test_an_impossible_draw_names_the_file_the_label_and_k_shot(tmp_path):
    folder = tmp_path / "pets"
    folder.mkdir()
    write_jsonl(folder / "pool.jsonl", [{"text": f"cat {i}", "label": "cat"} for i in range(8)]
                + [{"text": f"dog {i}", "label": "dog"} for i in range(40)])
    with pytest.raises(DataError) as info:
        load_task_folder(folder, PETS, seed=42, k=16)
    message = str(info.value)
    assert str(folder / "pool.jsonl") in message and "label 'cat' has 8 examples" in message
    assert "--k-shot to 4" in message and "class 0" not in message
    assert len(load_task_folder(folder, PETS, seed=42, k=4).dev) == 8  # as the message says


def test_a_train_file_alone_is_still_a_pool(tmp_path, sst2_task):
    data = load_task_folder(_pets(tmp_path / "pets", train=10, dev=None), sst2_task, seed=3, k=4)
    assert (len(data.train), len(data.dev)) == (8, 8)
    with pytest.raises(DataError, match="add a dev.jsonl beside it"):
        load_task_folder(tmp_path / "pets", sst2_task, seed=3, k=6)


# ---- 2. bad files refused with file and line ------------------------------------------------

def test_a_dev_file_that_is_not_json_is_refused_before_the_model_loads(tmp_path, capsys):
    folder = _pets(tmp_path / "pets")
    (folder / "dev.jsonl").write_text('{"text": "fine", "label": 1}\n{not json\n')
    assert main(_tune(folder, tmp_path / "run", "--model", NO_MODEL)) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'dev.jsonl'}:2: not valid JSON" in err and NO_MODEL not in err
    assert not (tmp_path / "run").exists()


def test_non_utf8_data_reports_the_line(tmp_path, sst2_task):
    path = tmp_path / "d.csv"
    path.write_bytes("text,label\nfine,1\n\"two\nlines\",0\ncaf\xe9,1\n".encode("latin-1"))
    with pytest.raises(DataError, match=f"{path}:5: not UTF-8") as info:
        from bbt.data import load_file

        load_file(path, sst2_task)
    assert "at byte" not in str(info.value)  # a line, not an offset


# ---- 3. bad rows: refused by default, skipped on request ------------------------------------

def _with_bad_rows(folder: Path) -> Path:
    _pets(folder)
    rows = sentiment_sentences(1, 8)
    rows.insert(2, {"text": "", "label": 0})  # line 3, as in the public split the issue found
    write_jsonl(folder / "train.jsonl", rows)
    test = sentiment_sentences(3, 4)
    test[5] = {"label": 1}
    test.append({"text": "   ", "label": 0})
    write_jsonl(folder / "test.jsonl", test)
    return folder


def test_bad_rows_are_refused_naming_file_and_line(tmp_path, sst2_task):
    folder = _with_bad_rows(tmp_path / "pets")
    with pytest.raises(DataError, match="'text' is missing or empty .*--skip-bad-rows") as info:
        load_task_folder(folder, sst2_task, seed=42)
    assert f"{folder / 'train.jsonl'}:3:" in str(info.value)


def test_skip_bad_rows_reports_how_many_per_file(tmp_path, sst2_task):
    folder = _with_bad_rows(tmp_path / "pets")
    data = load_task_folder(folder, sst2_task, seed=42, skip_bad_rows=True)
    assert (len(data.train), len(data.test)) == (16, 7)
    skipped = [n for n in data.notes if n.startswith("skipped")]
    assert skipped == [f"skipped 1 bad row of {folder / 'train.jsonl'} (line 3: 'text' is missing or empty)",
                       f"skipped 2 bad rows of {folder / 'test.jsonl'} (line 6: 'text' is missing or empty, "
                       "line 9: 'text' is missing or empty)"]


def test_skip_bad_rows_on_the_command_line_is_kept_by_the_run(tiny_encoder, tmp_path, capsys):
    folder, out = _with_bad_rows(tmp_path / "pets"), tmp_path / "run"
    assert main(_tune(folder, out, *_small(tiny_encoder), "--budget", "12", "--skip-bad-rows")) == 0
    assert "note: skipped 2 bad rows of" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["config"]["skip_bad_rows"] is True
    # evaluate reads the data as the run did
    assert main(["evaluate", "--run", str(out), "--split", "test"]) == 0
    assert json.loads(capsys.readouterr().out)["examples"] == 7


# ---- 4. inputs checked first; no half-written folders ---------------------------------------

def test_a_huge_test_line_fails_before_the_model_loads_naming_file_and_line(tmp_path, capsys):
    folder = _pets(tmp_path / "pets")
    with (folder / "test.jsonl").open("a") as fh:
        fh.write(json.dumps({"text": "x" * 50_000_000, "label": 1}) + "\n")
    assert main(_tune(folder, tmp_path / "run", "--model", NO_MODEL)) == 1
    err = capsys.readouterr().err
    assert f"{folder / 'test.jsonl'}:9: 'text' has 50,000,000 characters; the limit is {MAX_TEXT_CHARS:,}" in err
    assert NO_MODEL not in err and not (tmp_path / "run").exists()


def test_an_unknown_model_leaves_no_folder_and_no_resume_advice(tiny_encoder, tmp_path, capsys):
    folder, out = _pets(tmp_path / "pets"), tmp_path / "runs" / "x"
    assert main(_tune(folder, out, "--model", NO_MODEL)) == 1
    err = capsys.readouterr().err
    assert "--resume" not in err and not out.exists()
    assert main(_tune(folder, out, *_small(tiny_encoder), "--budget", "8")) == 0  # the same --out is free


def test_a_refused_endpoint_leaves_no_folder_and_no_resume_advice(tmp_path, capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    out = tmp_path / "run"
    code = main(_tune(_pets(tmp_path / "pets"), out, "--endpoint", f"http://127.0.0.1:{port}", "--wait", "0",
                      "--retries", "0"))
    assert code == 1
    err = capsys.readouterr().err
    assert "--resume" not in err and not out.exists()


def _failing_at(monkeypatch, call: int, exc: BaseException) -> None:
    """Make the run's evaluate request number `call` (1: the first query) raise `exc`."""
    from bbt.session import Session

    inner, calls = Session.query, [0]

    def query(*args, **kwargs):
        calls[0] += 1
        if calls[0] == call:
            raise exc
        return inner(*args, **kwargs)

    monkeypatch.setattr(Session, "query", query)


def test_ctrl_c_before_the_first_query_leaves_nothing(tiny_encoder, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    _failing_at(monkeypatch, 1, KeyboardInterrupt())
    assert main(_tune(_pets(tmp_path / "pets"), out, *_small(tiny_encoder), "--budget", "8")) == 130
    err = capsys.readouterr().err
    assert "nothing was spent" in err and "--resume" not in err and "keeps what was spent" not in err
    assert not out.exists()


def test_a_failure_after_the_first_answer_keeps_the_folder_and_says_resume(tiny_encoder, tmp_path, capsys,
                                                                          monkeypatch):
    folder, out = _pets(tmp_path / "pets"), tmp_path / "run"
    _failing_at(monkeypatch, 2, BackendError("the server went away"))
    assert main(_tune(folder, out, *_small(tiny_encoder), "--budget", "8")) == 1
    assert f"continue with: bbt tune --resume {out}" in capsys.readouterr().err
    monkeypatch.undo()
    assert main(["tune", "--resume", str(out), "--quiet", "--no-cache"]) == 0


@pytest.fixture
def finished_run(tiny_encoder, tmp_path) -> Path:
    out = tmp_path / "run"
    assert main(_tune(_pets(tmp_path / "pets"), out, *_small(tiny_encoder), "--budget", "12")) == 0
    return out


def test_a_damaged_checkpoint_says_how_to_go_on(finished_run, capsys):
    (finished_run / "metrics.json").unlink()
    (finished_run / "state.json").write_text("{not json")
    assert main(["tune", "--resume", str(finished_run), "--quiet", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert f"delete {finished_run / 'state.json'} and {finished_run / 'state.parts'}" in err
    assert f"bbt tune --resume {finished_run} again" in err
    (finished_run / "state.json").unlink()  # as the message says
    import shutil

    shutil.rmtree(finished_run / "state.parts", ignore_errors=True)
    assert main(["tune", "--resume", str(finished_run), "--quiet", "--no-cache"]) == 0
    assert (finished_run / "metrics.json").exists()


def test_a_checkpoint_of_an_earlier_bbt_is_refused_with_the_way_on(finished_run, capsys):
    """A run cut short under a bbt that pickled its checkpoints (RUN/state.pkl): refused, with what to delete."""
    import shutil

    (finished_run / "metrics.json").unlink()
    (finished_run / "state.json").unlink()
    shutil.rmtree(finished_run / "state.parts", ignore_errors=True)
    (finished_run / "state.pkl").write_bytes(b"\x80\x05K\x01.")
    (finished_run / "state.pkl.parts").mkdir()
    assert main(["tune", "--resume", str(finished_run), "--quiet", "--no-cache"]) == 1
    err = capsys.readouterr().err
    assert "checkpoint of an earlier bbt" in err
    assert f"delete {finished_run / 'state.pkl'} and {finished_run / 'state.pkl.parts'}" in err
    (finished_run / "state.pkl").unlink()  # as the message says
    (finished_run / "state.pkl.parts").rmdir()
    assert main(["tune", "--resume", str(finished_run), "--quiet", "--no-cache"]) == 0
    assert (finished_run / "metrics.json").exists()


def test_a_damaged_prompt_file_says_how_to_write_it_again(finished_run, capsys):
    """From a finished run's checkpoint, which keeps no CMA-ES: the arrays and state.json only."""
    assert [p.name.split("-")[0] for p in (finished_run / "state.parts").iterdir()] == ["arrays"]
    prompt = (finished_run / "prompt.json").read_text()
    before = json.loads((finished_run / "metrics.json").read_text())
    (finished_run / "prompt.json").write_text(prompt[: len(prompt) // 2])
    assert main(["evaluate", "--run", str(finished_run)]) == 1
    err = capsys.readouterr().err
    assert f"delete it and {finished_run / 'metrics.json'}, then bbt tune --resume {finished_run}" in err
    (finished_run / "prompt.json").unlink()  # as the message says
    (finished_run / "metrics.json").unlink()
    assert main(["tune", "--resume", str(finished_run), "--quiet", "--no-cache"]) == 0
    assert json.loads((finished_run / "prompt.json").read_text()) == json.loads(prompt)
    after = json.loads((finished_run / "metrics.json").read_text())
    assert (after["queries_used"], after["test_acc"]) == (before["queries_used"], before["test_acc"])


# ---- 5. budgets, strict JSON, a finished run's metrics --------------------------------------

@pytest.mark.parametrize("budget", ["1", "2"])
def test_a_budget_too_small_for_one_generation_is_refused_before_anything_is_spent(tiny_encoder, tmp_path, capsys,
                                                                                    budget):
    out = tmp_path / "run"
    assert main(_tune(_pets(tmp_path / "pets"), out, "--model", str(tiny_encoder), "--budget", budget)) == 1
    err = capsys.readouterr().err
    assert f"--budget {budget} runs no generation" in err and "the smallest budget that runs one generation is 3" in err
    assert not out.exists()


def test_a_budget_below_one_whole_generation_is_said(tiny_encoder, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_tune(_pets(tmp_path / "pets"), out, *_small(tiny_encoder), "--budget", "4")) == 0
    assert "less than one whole generation of --popsize 4" in capsys.readouterr().out


def test_strict_json_writes_null_for_what_is_not_finite():
    from bbt import jsonfile

    assert jsonfile.dumps({"a": float("inf"), "b": [1.5, float("nan")], "c": (float("-inf"),)}) == \
        '{"a": null, "b": [1.5, null], "c": [null]}'


def test_a_run_with_no_generation_writes_strict_json(tiny_encoder, tmp_path, capsys):
    """--verbalizer auto's first query takes the only request: no generation, an infinite train loss."""
    out = tmp_path / "run"
    assert main(_tune(_pets(tmp_path / "pets"), out, *_small(tiny_encoder), "--budget", "none",
                      "--max-requests", "1")) == 0
    assert "no generation ran" in capsys.readouterr().out
    metrics = _strict(out / "metrics.json")
    assert metrics["generations"] == 0 and metrics["train_loss"] is None and metrics["queries_per_second"] is None
    for path in [*out.glob("*.json"), *out.glob("*.jsonl")]:
        for line in path.read_text().splitlines() if path.suffix == ".jsonl" else [path.read_text()]:
            json.loads(line, parse_constant=lambda name: pytest.fail(f"{path}: {name}"))


def test_every_json_file_of_a_run_is_strict_and_the_speed_plausible(finished_run):
    metrics = _strict(finished_run / "metrics.json")
    for name in ("config.json", "path.json", "prompt.json"):
        _strict(finished_run / name)
    qps = metrics["queries_per_second"]
    assert qps is None or qps <= metrics["queries_used"] / max(metrics["tuning_seconds"], 1e-3) + 1


def test_resuming_a_finished_run_prints_its_metrics(finished_run, capsys):
    assert main(["tune", "--resume", str(finished_run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "already finished; its metrics:" in out
    printed = json.loads(out[out.index("{"):])
    assert printed == json.loads((finished_run / "metrics.json").read_text())


# ---- 6. below the plain model ---------------------------------------------------------------

def test_below_plain_names_each_split_where_the_prompt_is_worse():
    from bbt.runs import below_plain

    m = {"test_split": "test", "dev_acc": 0.5, "no_prompt_dev_acc": 0.625, "test_acc": 0.7, "no_prompt_test_acc": 0.6}
    assert "dev accuracy 0.5000, plain model 0.6250" in below_plain(m) and "test accuracy" not in below_plain(m)
    m.update(test_acc=0.55)
    assert "test accuracy 0.5500, plain model 0.6000" in below_plain(m)
    assert below_plain({**m, "dev_acc": 0.7, "test_acc": 0.6}) is None  # equal is not below
    # a folder without a test set scores "test" on dev: said once, under its name
    no_test = below_plain({"test_split": "dev", "dev_acc": 0.4, "test_acc": 0.4, "no_prompt_test_acc": 0.5})
    assert no_test.count("dev") == 1
    assert "F1" in below_plain({"test_split": "test", "test_acc": 0.7, "no_prompt_test_acc": 0.6, "test_f1": 0.5,
                                "no_prompt_test_f1": 0.6})


def test_the_end_of_a_run_warns_when_the_prompt_is_below_the_plain_model(tiny_encoder, tmp_path, capsys,
                                                                         monkeypatch):
    from dataclasses import replace

    from bbt import scoring

    scored = scoring.evaluate_materialized

    def worse(*args, **kwargs):  # the tuned prompt gets every test example wrong
        ev, logits, received = scored(*args, **kwargs)
        return replace(ev, accuracy=0.0, metric=0.0), logits, received

    monkeypatch.setattr(scoring, "evaluate_materialized", worse)
    out = tmp_path / "run"
    assert main(_tune(_pets(tmp_path / "pets"), out, *_small(tiny_encoder), "--budget", "12")) == 0
    printed = capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    assert 0 <= metrics["no_prompt_dev_acc"] <= 1 and metrics["no_prompt_test_acc"] > 0
    assert f"test accuracy 0.0000, plain model {metrics['no_prompt_test_acc']:.4f}" in printed
    assert "warning: the tuned prompt scores below the plain model" in printed


def test_metrics_json_has_one_schema_and_every_field_is_documented(tmp_path):
    import re

    import pydantic

    from bbt import rundir

    section = (Path(__file__).parent.parent / "docs" / "runs.md").read_text().split("## metrics.json", 1)[1]
    section = section.split("\n## ", 1)[0]
    documented = set(re.findall(r"`([a-z_0-9]+)`", section))
    assert set(rundir.RunMetrics.model_fields) <= documented, set(rundir.RunMetrics.model_fields) - documented
    # only the fields given are written (None included), with the schema's version; a misspelt one is refused
    written = rundir.write_metrics(tmp_path, test_acc=0.75, dev_acc=None, queries_used=12)
    assert written == {"version": rundir.METRICS_VERSION, "test_acc": 0.75, "dev_acc": None, "queries_used": 12}
    assert rundir.read_metrics(tmp_path) == written
    with pytest.raises(pydantic.ValidationError, match="test_accuracy"):
        rundir.write_metrics(tmp_path, test_accuracy=0.75)
    assert rundir.read_metrics(tmp_path) == written  # the refused write left the file as it was
    assert rundir.read_metrics(tmp_path / "nowhere") is None
