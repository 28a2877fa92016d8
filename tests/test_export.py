"""Materialized prompts in the run folder and `bbt export`: a PEFT adapter that PEFT loads and that
reproduces bbt's class logits, bbt's own file for deep prompts, and clear refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt.cli import main
from bbt.data import Split, TaskData
from bbt.errors import ConfigError
from bbt.export import load_prompts, to_bbt, to_peft
from bbt.protocol import EvaluateRequest, Example
from bbt.rundir import load_artifact
from bbt.runs import predict, run_tune

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'bbt[peft]')")


def _tune(model, data_dir, out, *extra):
    """A BBT run (the causal-LM default is BBTv2; an --method in `extra` comes later and wins)."""
    assert main(["tune", "--model", str(model), "--method", "bbt", "--task", "sst2", "--data", str(data_dir), "--seed", "13",
                 "--prompt-length", "3", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "8",
                 "--out", str(out), "--no-cache", "--quiet", *extra]) == 0


def _peft_class_logits(model_dir, adapter, family, task, examples):
    """Class logits [N, C] from PEFT: the base model from its folder, the adapter on top, bbt's
    token ids of each input, the verbalizer words' logits at the read position."""
    import torch
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_dir)
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    verb = family.verbalizer_ids(task)[0]
    length = json.loads((adapter / "adapter_config.json").read_text())["num_virtual_tokens"]
    rows = []
    with torch.no_grad():
        for ex in examples:
            ids, read = family.encode_one(task, ex)
            logits = model(input_ids=torch.tensor([ids])).logits[0]  # (L + T, V): PEFT's virtual tokens come first
            rows.append(logits[length + read, verb].numpy())
    return np.stack(rows)


@pytest.mark.parametrize("init", ["zero", "vocab"])
def test_run_folder_holds_the_prompt_the_model_received(tiny_gpt2, data_dir, tmp_path, local_backend, init):
    run = tmp_path / "run"
    _tune(tiny_gpt2, data_dir, run, "--init", init)
    prompts = load_prompts(run)
    prompt = load_artifact(run).prompt()
    want = prompt.materialize()[0]  # A z, client side
    if init == "vocab":
        want = want + local_backend.service.get(str(tiny_gpt2)).init_prompt(prompt.init_seed, 3)[None]
    assert prompts.shape == (1, 3, 32)
    np.testing.assert_allclose(prompts, want, atol=1e-6)


def test_peft_adapter_reproduces_bbts_class_logits(tiny_gpt2, data_dir, tmp_path, local_backend, capsys):
    run, adapter = tmp_path / "run", tmp_path / "adapter"
    _tune(tiny_gpt2, data_dir, run, "--init", "vocab")
    assert main(["export", "--run", str(run), "--format", "peft", "--out", str(adapter)]) == 0
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"], config["num_virtual_tokens"], config["token_dim"]) == (
        "PROMPT_TUNING", "CAUSAL_LM", 3, 32)
    artifact = load_artifact(run)
    family = local_backend.service.get(str(tiny_gpt2)).family
    examples = [Example(text=t) for t in ("a great film", "bad and dull", "good", "great great bad")]
    want = local_backend.evaluate(EvaluateRequest(model=str(tiny_gpt2), task=artifact.task, inputs=examples,
                                                  return_logits=True, candidates=artifact.prompt().candidates()))
    got = _peft_class_logits(tiny_gpt2, adapter, family, artifact.task, examples)
    np.testing.assert_allclose(got, want.logits.to_numpy()[0], atol=1e-4)
    # a second export to the same folder overwrites nothing
    before = (adapter / "adapter_model.safetensors").read_bytes()
    assert main(["export", "--run", str(run), "--format", "peft", "--out", str(adapter)]) != 0
    assert "nothing was overwritten" in capsys.readouterr().err
    assert (adapter / "adapter_model.safetensors").read_bytes() == before


def test_deep_prompts_export_as_bbts_own_file_not_peft(tiny_gpt2, data_dir, tmp_path):
    run = tmp_path / "v2"
    _tune(tiny_gpt2, data_dir, run, "--method", "bbtv2")
    with pytest.raises(ConfigError, match="--format bbt"):
        to_peft(run, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    out = to_bbt(run, tmp_path / "deep")
    meta = json.loads((out / "bbt_prompt.json").read_text())
    assert (meta["format"], meta["version"], meta["layers"], meta["prompt_length"]) == ("bbt-deep-prompt", 1, 2, 3)
    from safetensors.numpy import load_file

    np.testing.assert_array_equal(load_file(str(out / "prompts.safetensors"))["prompts"], load_prompts(run))


def test_a_prompt_after_a_bos_token_is_not_exported_to_peft(tiny_llama, data_dir, tmp_path):
    run = tmp_path / "llama"
    _tune(tiny_llama, data_dir, run)
    assert load_artifact(run).prompt_position == 1
    with pytest.raises(ConfigError, match="leading special token"):
        to_peft(run, tmp_path / "peft")
    to_bbt(run, tmp_path / "own")  # bbt's own file still works


@pytest.mark.slow
def test_smollm2_peft_export_predicts_what_bbt_predicts(smollm2, tmp_path, local_backend):
    """The real SmolLM2 (no BOS: PEFT's and bbt's placements agree): PEFT's labels equal `bbt predict`'s."""
    from bbt.budget import Budget
    from bbt.config import TuneConfig
    from bbt.tasks import BUILTIN_TASKS
    from servers.loading import load_pretrained

    texts = ["a gorgeous, witty film", "tedious and far too long", "the acting is superb", "a flat, lifeless mess",
             "i enjoyed it", "i hated it"]
    split = Split([Example(text=t) for t in texts], [1, 0, 1, 0, 1, 0])
    data = TaskData(train=split, dev=split, test=split)
    cfg = TuneConfig(model="smollm2", method="bbt", seed=1, prompt_length=4, intrinsic_dim=20, popsize=4, init="vocab",
                     budget=Budget(queries=8))
    run = tmp_path / "run"
    run_tune(cfg, BUILTIN_TASKS["sst2"], data, local_backend, run, progress=False, log=lambda *a: None)
    adapter = to_peft(run, tmp_path / "adapter")
    artifact = load_artifact(run)
    model = local_backend.service.get("smollm2")
    bbt_labels = [label for label, _ in predict(local_backend, artifact, texts)]

    import torch

    base = load_pretrained("smollm2", device="cpu")[3]  # a copy of its own: PEFT wraps the model it is given
    peft_model = peft.PeftModel.from_pretrained(base, adapter).eval()
    verb = model.family.verbalizer_ids(artifact.task)[0]
    rows = []
    with torch.no_grad():
        for t in texts:
            ids, read = model.family.encode_one(artifact.task, Example(text=t))
            rows.append(peft_model(input_ids=torch.tensor([ids])).logits[0, 4 + read, verb].numpy())
    got = np.stack(rows)
    want = local_backend.evaluate(EvaluateRequest(model="smollm2", task=artifact.task, inputs=split.examples,
                                                  return_logits=True, candidates=artifact.prompt().candidates()))
    np.testing.assert_allclose(got, want.logits.to_numpy()[0], atol=1e-4)
    assert [artifact.task.labels[int(r.argmax())] for r in got] == bbt_labels
