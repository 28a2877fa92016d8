"""The gradient baselines through PEFT: each method trains on each family it can run, writes a run
folder like BBT's, reads the class where bbt reads it, and is refused where it cannot run."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt.cli import main

pytest.importorskip("peft", reason="peft is not installed (pip install 'bbt[peft]')")


def _tune(model, data_dir, out, method, *extra) -> int:
    return main(["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
                 "--method", method, "--prompt-length", "3", "--epochs", "4", "--batch-size", "4",
                 "--out", str(out), "--no-cache", "--quiet", *extra])


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("fixture", ["tiny_gpt2", "tiny_llama"])
def test_each_method_trains_a_causal_lm_and_writes_a_run_folder(fixture, method, data_dir, tmp_path, request):
    model = request.getfixturevalue(fixture)
    out = tmp_path / "run"
    assert _tune(model, data_dir, out, method) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("train_acc", "dev_acc", "test_acc", "no_prompt_test_acc", "train_loss", "dev_loss", "test_loss"):
        assert m[key] is not None and np.isfinite(m[key]), key
    assert m["method"] == method and m["epochs"] == 4 and 1 <= m["best_epoch"] <= 4
    assert m["backward_passes"] == 4 * 2 and m["examples_seen"] == 4 * 8  # 8 training examples, batches of 4
    assert m["forward_passes"] > m["backward_passes"] and m["trainable_parameters"] > 0
    log = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3, 4]
    assert (out / "adapter" / "adapter_config.json").is_file()
    config = json.loads((out / "config.json").read_text())["config"]
    assert config["method"] == method and config["verbalizer"] == "manual"  # the task's own words, trained


def test_training_lowers_the_loss_and_the_best_dev_state_is_kept(tiny_gpt2, local_backend, tiny_data, sst2_task):
    from bbt.tasks import for_family
    from servers import gradient

    pm = local_backend.service.get(str(tiny_gpt2))
    task = for_family(sst2_task, "causal")
    recipe = gradient.Recipe("prompt-tuning", length=3, seed=0, epochs=8, batch_size=8, patience=None)
    result = gradient.train(pm, task, tiny_data.train, tiny_data.dev, recipe)
    losses = [r["train_loss"] for r in result.history]
    assert min(losses[1:]) < losses[0]
    best = max(result.history, key=lambda r: (r["dev_metric"], -r["dev_loss"]))
    assert result.best_epoch == best["epoch"]
    assert result.dev.loss == pytest.approx(best["dev_loss"], abs=1e-5)  # the kept state is that epoch's


def test_class_read_equals_bbts_for_the_same_prompt(tiny_gpt2, local_backend, tiny_data, sst2_task):
    """A PEFT prompt-tuning model whose virtual tokens are bbt's prompt scores what bbt scores."""
    import torch
    from peft import get_peft_model

    from bbt.protocol import EvaluateRequest, PromptTensor, Tensor
    from bbt.tasks import for_family
    from servers import gradient

    pm = local_backend.service.get(str(tiny_gpt2))
    task = for_family(sst2_task, "causal")
    peft_model = get_peft_model(__import__("copy").copy(pm.model), gradient.peft_config("prompt-tuning", "causal", 3, 32))
    prompt = np.random.default_rng(0).normal(0, 0.02, (3, 32)).astype(np.float32)
    with torch.no_grad():
        peft_model.prompt_encoder["default"].embedding.weight.copy_(torch.from_numpy(prompt))
    got = gradient.predict_logits(pm, peft_model, task, tiny_data.dev.examples, "prompt-tuning")
    req = EvaluateRequest(model=str(tiny_gpt2), task=task, inputs=tiny_data.dev.examples, return_logits=True,
                          candidates=PromptTensor(prompts=Tensor.from_numpy(prompt[None, None])))
    np.testing.assert_allclose(got, local_backend.evaluate(req).logits.to_numpy()[0], atol=1e-4)


@pytest.mark.parametrize("method", ["prompt-tuning", "p-tuning-v2"])
@pytest.mark.parametrize("fixture", ["tiny_encoder", "tiny_bert_mlm"])
def test_prompt_and_prefix_methods_run_on_encoders_and_masked_lms(fixture, method, data_dir, tmp_path, request):
    model = request.getfixturevalue(fixture)
    assert _tune(model, data_dir, tmp_path / "run", method) == 0
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert np.isfinite(m["test_acc"]) and m["backward_passes"] == 8


def test_a_prompt_over_the_models_limit_is_refused_before_anything_is_written(tiny_encoder, data_dir, tmp_path, capsys):
    assert _tune(tiny_encoder, data_dir, tmp_path / "long", "prompt-tuning", "--prompt-length", "999") != 0
    assert "limit" in capsys.readouterr().err
    assert not (tmp_path / "long").exists()


def test_automatic_words_are_refused_to_a_gradient_method(tiny_encoder, data_dir, tmp_path, capsys):
    assert _tune(tiny_encoder, data_dir, tmp_path / "words", "prompt-tuning", "--verbalizer", "auto") != 0
    assert "is for bbt and bbtv2" in capsys.readouterr().err
    assert not (tmp_path / "words").exists()


def test_a_gradient_method_needs_the_weights(data_dir, tmp_path, capsys):
    code = main(["tune", "--task", "sst2", "--data", str(data_dir), "--seed", "13", "--method", "prompt-tuning",
                 "--endpoint", "http://127.0.0.1:9", "--out", str(tmp_path / "r"), "--no-cache", "--quiet"])
    assert code != 0 and "needs the weights" in capsys.readouterr().err


def test_an_existing_run_folder_is_not_overwritten(tiny_gpt2, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _tune(tiny_gpt2, data_dir, out, "prompt-tuning") == 0
    before = (out / "metrics.json").read_text()
    assert _tune(tiny_gpt2, data_dir, out, "p-tuning") != 0
    assert "nothing was overwritten" in capsys.readouterr().err
    assert (out / "metrics.json").read_text() == before


def test_evaluate_and_predict_read_a_gradient_run(tiny_gpt2, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _tune(tiny_gpt2, data_dir, out, "p-tuning-v2") == 0
    m = json.loads((out / "metrics.json").read_text())
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--split", "test"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["method"] == "p-tuning-v2"
    assert result["acc"] == pytest.approx(m["test_acc"]) and result["no_prompt_acc"] == pytest.approx(m["no_prompt_test_acc"])
    assert main(["predict", "--run", str(out), "a great film", "bad"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert [x["text"] for x in lines] == ["a great film", "bad"] and all(x["label"] in ("negative", "positive") for x in lines)


@pytest.mark.parametrize("damage", ["config-not-json", "no-weights", "weights-truncated", "other-width", "other-method"])
def test_an_adapter_peft_cannot_read_or_made_for_another_model_is_refused(damage, tiny_gpt2, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert _tune(tiny_gpt2, data_dir, out, "prompt-tuning") == 0
    adapter, before = out / "adapter", (out / "metrics.json").read_text()
    config = json.loads((adapter / "adapter_config.json").read_text())
    if damage == "config-not-json":
        (adapter / "adapter_config.json").write_text("{not json")
    elif damage == "no-weights":
        (adapter / "adapter_model.safetensors").unlink()
    elif damage == "weights-truncated":
        weights = adapter / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:40])
    else:
        config.update({"token_dim": 64} if damage == "other-width" else {"peft_type": "PREFIX_TUNING"})
        (adapter / "adapter_config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--split", "test"]) != 0
    err = capsys.readouterr().err
    assert "adapter" in err and "Traceback" not in err
    if damage in ("other-width", "other-method"):
        assert "not made for this model and method" in err and ("64" in err or "PREFIX_TUNING" in err)
    assert (out / "metrics.json").read_text() == before


def _run_gradient(tiny_gpt2, local_backend, tiny_data, sst2_task, out, **log):
    from bbt import runs
    from bbt.config import TuneConfig

    cfg = TuneConfig(model=str(tiny_gpt2), method="prompt-tuning", prompt_length=3, epochs=2, batch_size=8, seed=13)
    return runs.run_gradient(cfg, sst2_task, tiny_data, local_backend, out, **({"log": lambda _: None} | log))


def _watch_training(monkeypatch, out, fail: bool = False) -> list[dict]:
    """running.json as each epoch of the next gradient run finds it (read from inside training);
    with `fail`, that run fails after its first epoch."""
    from servers import gradient

    seen, train = [], gradient.train

    def watched(*args, on_epoch, **kwargs):
        def each(record):
            seen.append(json.loads((out / "running.json").read_text()))
            on_epoch(record)
            if fail:
                raise RuntimeError("stopped in training")

        return train(*args, on_epoch=each, **kwargs)

    monkeypatch.setattr(gradient, "train", watched)
    return seen


def test_running_json_names_this_process_while_a_gradient_run_trains(tiny_gpt2, local_backend, tiny_data, sst2_task,
                                                                     tmp_path, monkeypatch):
    import os

    out = tmp_path / "run"
    seen = _watch_training(monkeypatch, out)
    _run_gradient(tiny_gpt2, local_backend, tiny_data, sst2_task, out)
    assert [s["pid"] for s in seen] == [os.getpid()] * 2  # each of the 2 epochs
    assert (out / "metrics.json").is_file() and not (out / "running.json").exists()


def test_a_gradient_run_that_fails_in_training_removes_running_json(tiny_gpt2, local_backend, tiny_data, sst2_task,
                                                                     tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = _watch_training(monkeypatch, out, fail=True)
    with pytest.raises(RuntimeError, match="stopped in training"):
        _run_gradient(tiny_gpt2, local_backend, tiny_data, sst2_task, out)
    assert len(seen) == 1 and not (out / "running.json").exists()
    # the plain model was scored (its requests are in the ledger): the folder stays, unfinished
    assert (out / "config.json").is_file() and (out / "ledger.jsonl").stat().st_size > 0
    assert not (out / "metrics.json").exists()


def test_a_gradient_run_that_fails_before_spending_leaves_no_folder(tiny_gpt2, local_backend, tiny_data, sst2_task,
                                                                     tmp_path, monkeypatch):
    from bbt import scoring

    out, held = tmp_path / "run", []

    def refused(*args, **kwargs):
        held.append((out / "running.json").exists())
        raise RuntimeError("the server refused")

    monkeypatch.setattr(scoring, "evaluate_split", refused)
    with pytest.raises(RuntimeError, match="the server refused"):
        _run_gradient(tiny_gpt2, local_backend, tiny_data, sst2_task, out)
    assert held == [True] and not out.exists()
