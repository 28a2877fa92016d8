"""--dtype: a model run in bfloat16, with its norms, softmax and read-out kept in float32.

Checked on the tiny models of every family: what is cast and what is not, logits near float32's
and ranked alike, BBTv2's layer reuse still equal to a full pass, the precision stated in
/v1/models, config.json and metrics.json, a resumed run kept in its precision, and a cache entry
paid in one precision never answering the other.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from bbt.cli import main
from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, Example, PromptTensor, Tensor
from bbt.tasks import BUILTIN_TASKS
from conftest import FAMILIES

torch = pytest.importorskip("torch")

TEXTS = ["the film was great and good", "this movie was dull", "nice", "the story was awful and boring and weak"]


def _request(model: str, hidden: int, k: int = 6, layers: int = 1, seed: int = 0, layer: int | None = None):
    prompts = np.random.default_rng(seed).normal(0, 0.5, (k, layers, 4, hidden)).astype(np.float32)
    if layer is not None:
        prompts[:, :layer] = prompts[:1, :layer]
    return EvaluateRequest(model=model, task=BUILTIN_TASKS["sst2"], inputs=[Example(text=t) for t in TEXTS],
                           labels=[1, 0, 1, 0], candidates=PromptTensor(prompts=Tensor.from_numpy(prompts), layer=layer),
                           return_logits=True)


@pytest.fixture(scope="module", params=list(FAMILIES))
def both(request):
    """(kind, float32 service, bfloat16 service) for one tiny model."""
    from servers.service import ModelService

    path = request.getfixturevalue(FAMILIES[request.param])
    return (request.param, ModelService([f"m={path}"], device="cpu"),
            ModelService([f"m={path}"], device="cpu", dtype="bfloat16"))


def test_bfloat16_casts_the_layers_and_keeps_norms_and_read_out_in_float32(both):
    from servers.precision import Float32Norm, is_norm

    kind, full, half = both
    pm = half.get("m")
    assert pm is not full.get("m") and pm.dtype == "bfloat16" and full.get("m").dtype == "float32"
    wrapped = [m for m in pm.model.base_model.modules() if isinstance(m, Float32Norm)]
    in_norms = {id(p) for w in wrapped for p in w.parameters()}
    weights = [p for p in pm.layers.parameters() if id(p) not in in_norms]  # Linear, or GPT-2's Conv1D
    assert weights and all(p.dtype == torch.bfloat16 for p in weights)
    assert wrapped and all(p.dtype == torch.float32 for w in wrapped for p in w.parameters())
    # no norm left in bfloat16 outside a wrapper
    assert not [m for m in pm.model.modules() if is_norm(m) and any(p.dtype == torch.bfloat16 for p in m.parameters())]
    out = pm.model.get_output_embeddings() if hasattr(pm.model, "get_output_embeddings") else None
    if out is not None:  # the LM head reads in float32, untied from the bfloat16 input embeddings
        assert out.weight.dtype == torch.float32 and pm.word_embeddings.weight.dtype == torch.bfloat16
    assert full.get("m").model.get_input_embeddings().weight.dtype == torch.float32  # the float32 copy is untouched


def test_bfloat16_logits_are_float32_near_float32s_and_rank_alike(both):
    kind, full, half = both
    hidden = full.get("m").hidden_size
    a, b = full.evaluate(_request("m", hidden)), half.evaluate(_request("m", hidden))
    la, lb = a.logits.to_numpy(), b.logits.to_numpy()
    assert lb.dtype == np.float32 and np.isfinite(lb).all()
    assert not np.array_equal(la, lb)  # it really ran in another precision
    scale = np.abs(la).max()
    assert np.abs(la - lb).max() <= 0.1 * scale + 0.05, (kind, np.abs(la - lb).max(), scale)
    ranks = [np.argsort(np.argsort(x.losses)) for x in (a, b)]
    assert np.corrcoef(*ranks)[0, 1] >= 0.7, (kind, a.losses, b.losses)
    assert half.get("m").info().dtype == "bfloat16" and full.get("m").info().dtype == "float32"


def test_bbtv2_layer_reuse_in_bfloat16_equals_a_full_pass(both):
    """The candidates share their prompts below layer 1: the kept lower states in bfloat16 give what
    every candidate running the whole stack gives."""
    kind, _, half = both
    pm = half.get("m")
    req = _request("m", pm.hidden_size, layers=pm.num_layers, layer=1, seed=3)
    reused = half.evaluate(req).logits.to_numpy()
    pm.reuse_lower_layers = False
    try:
        plain = half.evaluate(req).logits.to_numpy()
    finally:
        pm.reuse_lower_layers = True
    np.testing.assert_allclose(reused, plain, atol=0.05 * max(1.0, np.abs(plain).max()))


def test_auto_picks_bfloat16_only_where_it_pays_and_keeps_the_accuracy(monkeypatch):
    from servers import precision

    cpu = torch.device("cpu")
    monkeypatch.setattr(precision, "matmul_speedup", lambda: 2.9)
    # as shipped: causal LMs kept their accuracy within the goal in bfloat16 (SmolLM2); encoders: not measured
    assert precision.AUTO_FAMILIES == ("causal",)
    assert precision.resolve("auto", cpu, "causal") == "bfloat16"
    monkeypatch.setattr(precision, "AUTO_FAMILIES", ())  # a family not measured
    assert precision.resolve("auto", cpu, "causal") == "float32"
    monkeypatch.setattr(precision, "AUTO_FAMILIES", ("causal",))
    assert precision.resolve("auto", cpu, "encoder") == "float32"
    monkeypatch.setattr(precision, "matmul_speedup", lambda: 1.1)  # a CPU without bfloat16 units
    assert precision.resolve("auto", cpu, "causal") == "float32"
    assert precision.resolve("auto", torch.device("mps"), "causal") == "float32"  # not measured there
    assert precision.resolve(None, cpu) == "float32" and precision.resolve("bfloat16", cpu) == "bfloat16"
    with pytest.raises(ConfigError, match="unknown dtype 'float16'"):
        precision.resolve("float16", cpu)


def test_the_cache_keeps_precisions_apart_and_old_float32_keys_valid(both):
    from bbt.cache import request_key

    _, full, half = both
    req = _request("m", full.get("m").hidden_size)
    info32, info16 = full.get("m").info(), half.get("m").info()
    assert request_key("evaluate", info32, req) != request_key("evaluate", info16.model_copy(
        update={k: getattr(info32, k) for k in ("embedding_std", "hidden_std")}), req)  # the precision alone differs
    # a float32 answer cached before --dtype existed keeps its key: the identity then had no dtype field
    h = hashlib.sha256()
    for part in ("evaluate", info32.model_dump_json(exclude={"engine", "dtype"}),
                 req.model_dump_json(exclude={"candidates": {"layer"}})):
        h.update(part.encode())
        h.update(b"\0")
    assert request_key("evaluate", info32, req) == h.hexdigest()


def _tune(model, data_dir, out, *extra):
    return main(["tune", "--model", str(model), "--task", "sst2", "--data", str(data_dir), "--seed", "13",
                 "--prompt-length", "4", "--intrinsic-dim", "8", "--popsize", "4", "--budget", "12",
                 "--verbalizer", "manual", "--out", str(out), "--no-cache", "--quiet", *extra])


def test_a_run_records_its_precision_and_resumes_in_it(tiny_llama, data_dir, tmp_path, capsys):
    out = tmp_path / "r"
    assert _tune(tiny_llama, data_dir, out, "--method", "bbtv2", "--dtype", "bfloat16") == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert json.loads((out / "metrics.json").read_text())["dtype"] == "bfloat16"
    plain = tmp_path / "p"
    assert _tune(tiny_llama, data_dir, plain, "--method", "bbtv2") == 0  # float32 by default
    assert json.loads((plain / "metrics.json").read_text())["dtype"] == "float32"
    # cut the bfloat16 run after its checkpoint: resumed, it pays in bfloat16 again and ends as an unbroken run
    cut = tmp_path / "cut"
    assert _tune(tiny_llama, data_dir, cut, "--method", "bbtv2", "--dtype", "bfloat16") == 0
    (cut / "metrics.json").unlink()
    assert main(["tune", "--resume", str(cut), "--no-cache", "--quiet"]) == 0
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (out, cut))
    assert b["dtype"] == "bfloat16" and b["test_loss"] == a["test_loss"]
    # bbt evaluate loads the model in the precision the run was tuned in: the run's own test loss
    capsys.readouterr()
    assert main(["evaluate", "--run", str(out), "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] == pytest.approx(a["test_loss"], abs=1e-6)
    assert main(["evaluate", "--run", str(out), "--quiet", "--dtype", "float32"]) == 0
    assert json.loads(capsys.readouterr().out)["loss"] != pytest.approx(a["test_loss"], abs=1e-6)


def test_gradient_methods_refuse_bfloat16(tiny_llama, data_dir, tmp_path, capsys):
    code = _tune(tiny_llama, data_dir, tmp_path / "g", "--method", "prompt-tuning", "--dtype", "bfloat16")
    assert code != 0
    assert "trains in float32" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()


def test_a_server_states_its_precision_and_a_client_asking_another_is_refused(tiny_llama, data_dir, tmp_path, capsys):
    import httpx

    from appserver import serving
    from servers.app import create_app
    from servers.service import ModelService

    service = ModelService([f"tiny={tiny_llama}"], lazy=False, device="cpu", dtype="bfloat16")
    with serving(create_app(service)) as url:
        card = httpx.get(f"{url}/v1/models/tiny").json()
        assert card["dtype"] == "bfloat16"
        out = tmp_path / "r"
        assert _tune("tiny", data_dir, out, "--endpoint", url, "--dtype", "float32") != 0
        err = capsys.readouterr().err
        assert "runs tiny in bfloat16" in err and "bbt serve --dtype float32" in err
        assert not out.exists()
        assert _tune("tiny", data_dir, out, "--endpoint", url) == 0  # no --dtype: the server's
        assert json.loads((out / "metrics.json").read_text())["dtype"] == "bfloat16"


def test_serve_with_upstream_refuses_a_dtype():
    from servers.app import serve

    with pytest.raises(ConfigError, match="vLLM runs them"):
        serve([], upstream="http://127.0.0.1:9", dtype="bfloat16")


def test_a_sweep_from_before_dtype_still_continues(tmp_path):
    from bbt import sweeps

    spec = sweeps.SweepSpec(tasks=["sst2"], seeds=[13], data_root=str(tmp_path))
    stored = {"version": sweeps.SWEEP_VERSION, **{k: v for k, v in vars(spec).items() if k not in ("api_key", "dtype")}}
    (tmp_path / sweeps.SWEEP_FILE).write_text(json.dumps(stored))
    assert sweeps.load_spec(tmp_path).dtype == "float32"
    sweeps._save_spec(tmp_path, spec)  # the same sweep: not refused
    with pytest.raises(ConfigError, match="different sweep"):
        sweeps._save_spec(tmp_path, sweeps.SweepSpec(tasks=["sst2"], seeds=[13], data_root=str(tmp_path),
                                                     dtype="bfloat16"))


def test_auto_loads_only_the_families_it_names_in_bfloat16(tiny_llama, tiny_encoder, monkeypatch):
    from servers import precision
    from servers.service import ModelService

    monkeypatch.setattr(precision, "matmul_speedup", lambda: 2.9)  # a CPU with bfloat16 units, as here
    monkeypatch.setattr(precision, "AUTO_FAMILIES", ("causal",))  # causal LMs measured to keep their accuracy
    service = ModelService([f"lm={tiny_llama}", f"enc={tiny_encoder}"], device="cpu", dtype="auto")
    assert service.get("lm").info().dtype == "bfloat16"
    assert service.get("enc").info().dtype == "float32"


def test_bbt_serve_dtype_bfloat16_serves_and_states_it(tiny_llama, data_dir, tmp_path):
    """The command line end to end: a `bbt serve --dtype bfloat16` process, a run tuned through it."""
    import httpx

    from serverproc import running_server

    with running_server("--model", f"tiny={tiny_llama}", "--dtype", "bfloat16") as server:
        assert httpx.get(f"{server.url}/v1/models/tiny").json()["dtype"] == "bfloat16"
        out = tmp_path / "r"
        assert _tune("tiny", data_dir, out, "--endpoint", server.url, "--dtype", "bfloat16") == 0
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
