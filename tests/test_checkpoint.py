"""Checkpoints: bbt's state as JSON and safetensors, each CMA-ES (pycma's state) in a part file of
its own, rewritten only when its state changed; checkpoints of earlier versions refused clearly."""

from __future__ import annotations

import json

import numpy as np
import pytest

from bbt import checkpoint
from bbt.checkpoint import RunState
from bbt.errors import ConfigError
from bbt.optimizer import CMAES
from bbt.projection import normal_spec
from bbt.prompt import Prompt
from bbt.tasks import BUILTIN_TASKS
from bbt.tuner import Evaluation, TuneState
from bbt.verbalizers import Choice


def _step(es: CMAES, seed: int) -> None:
    x = es.ask()
    es.tell(x, np.random.default_rng(seed).random(len(x)))


def _state(n: int = 3) -> RunState:
    rng = np.random.default_rng(0)
    prompt = Prompt(z=rng.standard_normal((n, 16)), projections=[normal_spec(seed=i, d=16, D=8, target_std=0.5)
                                                                    for i in range(n)], prompt_length=2, init_seed=7)
    tuning = TuneState(prompt=prompt, optimizers=[CMAES(16, popsize=6, seed=i) for i in range(n)],
                       best_z=rng.standard_normal((n, 16)))
    return RunState(plain=Evaluation(0.69, 0.5, 0.5, above_chance=0.1), ledger_step=3, tuning=tuning)


def test_a_whole_run_state_comes_back_equal_and_the_json_names_no_class(tmp_path):
    path, state = tmp_path / "state.json", _state(2)
    s = state.tuning
    _step(s.optimizers[0], 1)
    s.best_dev, s.generation, s.seconds, s.ledger_step = Evaluation(0.5, 0.75, 0.75), 4, 1.5, 9
    s.history = [{"generation": 1, "loss_min": 0.5, "dev_metric": None}]
    s.path = [(6, np.zeros((2, 16))), (12, s.best_z.copy())]
    s.stage, s.local_base, s.local_losses, s.fold, s.fold_start, s.chosen_fold = "local", s.best_z * 2, [0.4], 1, 3, 1
    state.choice = Choice(task=BUILTIN_TASKS["sst2"].model_copy(update={"verbalizer": [["bad", "awful"], "great"]}),
                          label_words=2, held_out={1: 0.5, 2: 0.75}, beats_own={2: 2.1}, queries=3)
    state.chosen_plain = Evaluation(0.6, 0.7, 0.7)
    checkpoint.save(path, state)

    loaded = checkpoint.load(path)
    t = loaded.tuning
    assert loaded.plain == state.plain and loaded.chosen_plain == state.chosen_plain and loaded.choice == state.choice
    assert t.best_train.loss == float("inf")  # not measured yet: infinite, and still so after the round trip
    for field in ("best_dev", "chosen_train", "generation", "seconds", "ledger_step", "history", "stage", "local_losses",
                  "fold", "fold_start", "chosen_fold"):
        assert getattr(t, field) == getattr(s, field), field
    for mine, theirs in [(s.prompt.z, t.prompt.z), (s.best_z, t.best_z), (s.local_base, t.local_base)]:
        assert np.array_equal(mine, theirs) and theirs.flags.writeable
    assert [q for q, _ in t.path] == [6, 12] and np.array_equal(t.path[1][1], s.best_z)
    assert t.prompt.projections == s.prompt.projections and t.prompt.init_seed == 7
    for mine, theirs in zip(s.optimizers, t.optimizers):
        assert np.array_equal(mine.ask(), theirs.ask())  # the same state, sampler included
    document = json.loads(path.read_text())
    assert document["format"] == checkpoint.FORMAT and "bbt." not in path.read_text()
    for part in document["optimizers"]:  # pycma's state: no class of bbt's but the sampler inside it
        assert b"CMAES" not in (checkpoint.parts_dir(path) / part).read_bytes()


def test_a_generation_rewrites_only_the_optimizer_it_moved(tmp_path):
    path, state = tmp_path / "state.json", _state()
    checkpoint.save(path, state)
    parts = checkpoint.parts_dir(path)
    first = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert len(first) == 3 + 1  # three CMA-ES and the arrays

    _step(state.tuning.optimizers[1], 0)  # BBTv2: one layer's CMA-ES per generation
    state.tuning.generation = 1
    checkpoint.save(path, state)
    second = {p.name: p.stat().st_mtime_ns for p in parts.iterdir()}
    assert len(second) == 4  # the part it replaced is gone
    assert set(first) - set(second) == {n for n in first if n.startswith("1-")}
    assert all(second[n] == first[n] for n in second if not n.startswith("1-"))  # untouched files, arrays included

    loaded = checkpoint.load(path)
    assert loaded.tuning.generation == 1
    for mine, theirs in zip(state.tuning.optimizers, loaded.tuning.optimizers):
        assert np.array_equal(mine.ask(), theirs.ask())


def test_the_path_keeps_only_the_layers_each_point_changed(tmp_path):
    """BBTv2 moves one layer per generation: the path stores that layer's z, not all of them,
    and every point comes back whole and exact."""
    from safetensors.numpy import load_file

    path, state = tmp_path / "state.json", _state(4)
    rng, z = np.random.default_rng(1), np.zeros((4, 16))
    points = [(0, z.copy())]
    for g in range(12):
        z[g % 4] = rng.standard_normal(16)
        points.append((6 * (g + 1), z.copy()))
    z[:] = rng.standard_normal((4, 16))  # a point that moves every layer (a second fold starting over) and more after it
    points += [(80, z.copy()), (86, z.copy() + np.eye(4, 16))]
    state.tuning.path = points
    checkpoint.save(path, state)

    document = json.loads(path.read_text())
    rows = load_file(checkpoint.parts_dir(path) / document["arrays"])["path_rows"]
    assert rows.shape == (4 + 12 + 4 + 4, 16)  # the first point whole, then what changed
    assert "path_z" not in load_file(checkpoint.parts_dir(path) / document["arrays"])
    loaded = checkpoint.load(path).tuning.path
    assert [q for q, _ in loaded] == [q for q, _ in points]
    assert all(np.array_equal(a, b) and b.flags.writeable for (_, a), (_, b) in zip(points, loaded))


def test_a_checkpoint_with_the_whole_path_still_resumes(tmp_path):
    """Format 3 (written before the path kept only changed layers) is read as it was written."""
    from safetensors.numpy import load_file, save_file

    path, state = tmp_path / "state.json", _state(2)
    state.tuning.path = [(6, np.zeros((2, 16))), (12, state.tuning.best_z.copy())]
    checkpoint.save(path, state)
    document = json.loads(path.read_text())
    parts = checkpoint.parts_dir(path)
    arrays = dict(load_file(parts / document["arrays"]))
    arrays["path_z"] = np.stack([z for _, z in state.tuning.path])
    del arrays["path_rows"]
    save_file(arrays, parts / document["arrays"])  # as format 3 wrote it
    del document["state"]["tuning"]["path_layers"]
    document["format"] = 3
    path.write_text(json.dumps(document))
    loaded = checkpoint.load(path).tuning.path
    assert [q for q, _ in loaded] == [6, 12] and np.array_equal(loaded[1][1], state.tuning.best_z)


def test_an_ask_without_a_tell_changes_the_part(tmp_path):
    """A cut final generation asks and never tells: its sampler has moved, so its part must be rewritten."""
    path, state = tmp_path / "state.json", _state(1)
    checkpoint.save(path, state)
    before = {p.name for p in checkpoint.parts_dir(path).iterdir()}
    state.tuning.optimizers[0].ask()
    checkpoint.save(path, state)
    after = {p.name for p in checkpoint.parts_dir(path).iterdir()}
    assert before != after
    assert np.array_equal(checkpoint.load(path).tuning.optimizers[0].ask(), state.tuning.optimizers[0].ask())


def test_a_state_before_the_search_has_no_parts(tmp_path):
    path = tmp_path / "state.json"
    checkpoint.save(path, RunState(plain=Evaluation(0.7, 0.5, 0.5), ledger_step=1))
    assert checkpoint.load(path) == RunState(plain=Evaluation(0.7, 0.5, 0.5), ledger_step=1)
    assert not checkpoint.parts_dir(path).exists()


def test_a_checkpoint_of_an_earlier_bbt_is_refused_and_removed_with_the_rest(tmp_path):
    path = tmp_path / "state.json"
    (tmp_path / "state.pkl").write_bytes(b"\x80\x05K\x01.")
    (tmp_path / "state.pkl.parts").mkdir()
    with pytest.raises(ConfigError, match="checkpoint of an earlier bbt"):
        checkpoint.load(path)
    checkpoint.remove(path)
    assert list(tmp_path.iterdir()) == [] and checkpoint.load(path) is None


def test_a_missing_part_is_a_clear_error_and_remove_clears_all(tmp_path):
    path = tmp_path / "state.json"
    checkpoint.save(path, _state(2))
    next(p for p in checkpoint.parts_dir(path).iterdir() if p.suffix == ".pkl").unlink()
    with pytest.raises(ConfigError, match="cannot read the checkpoint"):
        checkpoint.load(path)
    checkpoint.remove(path)
    assert not path.exists() and not checkpoint.parts_dir(path).exists()
    assert checkpoint.load(path) is None
