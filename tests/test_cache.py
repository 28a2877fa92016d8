"""The evaluation cache: a repeated experiment pays nothing, sharing is safe, a crash corrupts nothing."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from bbt.cache import CachedBackend, EvaluationCache, default_cache_path, request_key
from bbt.cli import main
from bbt.protocol import EvaluateRequest, IntrinsicPrompts, Tensor
from bbt.projection import uniform_spec
from test_resume import outcome, tune_args


def _request(task, data, z: np.ndarray, model: str) -> EvaluateRequest:
    spec = uniform_spec(seed=1, d=z.shape[-1], D=4 * 32)
    return EvaluateRequest(model=model, task=task, inputs=data.train.examples, labels=data.train.labels, return_logits=True,
                           candidates=IntrinsicPrompts(z=Tensor.from_numpy(z), projections=[spec], prompt_length=4))


def test_a_repeated_run_pays_nothing_and_ends_the_same(tiny_encoder, data_dir, tmp_path):
    cache = tmp_path / "cache.sqlite"
    first, second = tmp_path / "first", tmp_path / "second"
    assert main(tune_args(tiny_encoder, data_dir, first, "--cache", str(cache))) == 0
    assert main(tune_args(tiny_encoder, data_dir, second, "--cache", str(cache))) == 0
    m1, m2 = (json.loads((run / "metrics.json").read_text()) for run in (first, second))
    # the budget, then the test split: no prompt, zero and tuned prompt, and the plain model through the
    # words the default --verbalizer auto chose where they are not the task's own; then no prompt on dev
    passes = 4 + (m1["verbalizer"]["label_words"] > 1)
    assert m1["queries_paid"] == 48 + passes and m1["spending"]["cache_hits"] == 0
    assert m2["queries_paid"] == 0 and m2["spending"]["paid"]["tokens"] == 0
    assert m2["spending"]["cache_hits"] == m1["spending"]["tuning"]["requests"] + m1["spending"]["evaluation"]["requests"]
    assert outcome(first) == outcome(second)  # the budget counts a cached answer like a paid one: same decisions


def test_the_key_covers_model_task_inputs_and_candidate_bytes(local_backend, tiny_encoder, tiny_bert_mlm, sst2_task, tiny_data, tmp_path):
    backend = CachedBackend(local_backend, EvaluationCache(tmp_path / "c.sqlite"))
    z = np.full((2, 1, 8), 0.25)
    base = _request(sst2_task, tiny_data, z, str(tiny_encoder))
    answer, cached = backend.evaluate_cached(base)
    assert not cached
    again, cached = backend.evaluate_cached(base.model_copy())
    assert cached and again == answer
    nudged = z.copy()
    nudged[1, 0, 3] = np.nextafter(np.float32(0.25), np.float32(1))  # one float32 ulp of one candidate
    variants = [
        _request(sst2_task, tiny_data, nudged, str(tiny_encoder)),
        base.model_copy(update={"inputs": base.inputs[:-1], "labels": base.labels[:-1]}),
        base.model_copy(update={"task": sst2_task.model_copy(update={"template": sst2_task.template + " ."})}),
        base.model_copy(update={"loss": "hinge"}),
    ]
    for variant in variants:
        assert not backend.evaluate_cached(variant)[1]
    info_a, info_b = local_backend.model_info(str(tiny_encoder)), local_backend.model_info(str(tiny_bert_mlm))
    assert request_key("evaluate", info_a, base) != request_key("evaluate", info_b, base)
    assert backend.hits == 1 and backend.misses == 1 + len(variants)


def test_shared_by_threads_and_processes_without_damage(tmp_path):
    path = tmp_path / "shared.sqlite"
    writer = (
        "import sys\nfrom bbt.cache import EvaluationCache\n"
        "c = EvaluationCache(sys.argv[1])\n"
        "for i in range(300):\n    c.put(f'{sys.argv[2]}-{i}', 'evaluate', bytes([i % 256]) * 2000)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", writer, str(path), f"p{n}"], env=env) for n in range(3)]
    cache = EvaluationCache(path)
    errors = []

    def put_many(tag: str) -> None:
        try:
            for i in range(300):
                cache.put(f"{tag}-{i}", "evaluate", b"x" * 100)
                cache.get(f"p0-{i}")
        except Exception as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=put_many, args=(f"t{n}",)) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [p.wait(60) for p in procs] == [0, 0, 0]
    assert not errors
    assert len(cache) == 7 * 300
    assert cache.get("p2-299") == bytes([299 % 256]) * 2000


def test_a_process_killed_while_writing_leaves_a_sound_cache(tmp_path):
    path = tmp_path / "crash.sqlite"
    writer = (
        "import sys\nfrom bbt.cache import EvaluationCache\n"
        "c = EvaluationCache(sys.argv[1])\ni = 0\n"
        "while True:\n    c.put(f'k{i}', 'evaluate', bytes(50000)); i += 1\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", writer, str(path)], env={**os.environ, "PYTHONPATH": os.getcwd()})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and (tmp_path / "crash.sqlite-wal").exists() and (tmp_path / "crash.sqlite-wal").stat().st_size > 2e6:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(30) == -signal.SIGKILL
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    db.close()
    cache = EvaluationCache(path)
    n = len(cache)
    assert n > 10
    assert all(cache.get(f"k{i}") == bytes(50000) for i in range(n))  # every committed entry whole, in order


def test_where_the_cache_lives(monkeypatch, tmp_path):
    monkeypatch.setenv("BBT_CACHE", "off")
    assert default_cache_path() is None
    monkeypatch.setenv("BBT_CACHE", str(tmp_path / "x.sqlite"))
    assert default_cache_path() == tmp_path / "x.sqlite"
    monkeypatch.delenv("BBT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_cache_path() == tmp_path / "bbt" / "evaluations.sqlite"


def test_an_unusable_cache_path_is_a_clear_error(tiny_encoder, data_dir, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(tune_args(tiny_encoder, data_dir, tmp_path / "run", "--cache", str(blocker / "c.sqlite"))) == 1
    assert "cannot open the evaluation cache" in capsys.readouterr().err


def test_a_file_that_is_not_a_cache_is_refused(tmp_path):
    path = tmp_path / "bad.sqlite"
    path.write_bytes(b"garbage that is not sqlite" * 100)
    with pytest.raises(Exception, match="cannot open the evaluation cache"):
        EvaluationCache(path)


def test_an_unusable_default_cache_is_skipped_with_a_warning(tiny_encoder, data_dir, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    monkeypatch.delenv("BBT_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))  # e.g. a read-only home
    args = tune_args(tiny_encoder, data_dir, tmp_path / "run", budget=12)
    assert main(args) == 0
    assert "going on without a cache" in capsys.readouterr().err
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["spending"]["cache_hits"] == 0


def test_a_cache_from_before_payer_tags_is_upgraded_in_place(tmp_path):
    path = tmp_path / "old.sqlite"
    db = sqlite3.connect(path)
    db.execute("CREATE TABLE answers (key TEXT PRIMARY KEY, kind TEXT NOT NULL, body BLOB NOT NULL)")
    db.execute("INSERT INTO answers VALUES ('k', 'evaluate', x'0102')")
    db.commit()
    db.close()
    cache = EvaluationCache(path)
    assert cache.entry("k") == (b"\x01\x02", "")  # an old answer: nobody's tag
    cache.put("k2", "evaluate", b"\x03", payer="run/4")
    assert cache.entry("k2") == (b"\x03", "run/4")
    assert EvaluationCache(path).get("k") == b"\x01\x02"  # a second open finds the column there
