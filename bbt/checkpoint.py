"""The state of a tuning run on disk (RUN/state.json), replaced atomically after every generation.

What `bbt tune --resume RUN` continues from (`RunState`): the no-prompt baseline, the verbalizer
chosen, and the search: every CMA-ES (with its private sampler), the best prompts so far, the
projection specs, the generation count and where the run stands in its ledger.

    RUN/state.json     bbt's own state as versioned JSON, naming the files below
    RUN/state.parts/   N-<fingerprint>.pkl: pycma's state of the N-th CMA-ES, the one pickle
                       (pycma has no other complete form; its sampler, `bbt.optimizer._Randn`, with it)
                       arrays-<hash>.safetensors: the state's arrays (z of the prompts, the path)

The JSON names no Python class, so renaming one never breaks a checkpoint. A part is named by
its content and written only when that changed: BBTv2 keeps one CMA-ES per layer (d = 500:
about 4 MB each) and a generation moves only one of them, so a checkpoint of SmolLM2's 30
layers writes 4 MB instead of 120. The path (z after each generation, for the prompt at any
budget) is kept as the layers each point changed: a BBTv2 point adds one layer's z (4 kB), where
the whole z (120 kB, all 30 layers) made an 8000-query run rewrite 48 MB of path per generation.
Once the run is finished (metrics.json written), its checkpoint is written once more without the
CMA-ES, which nothing needs again: what stays (0.4 MB for BBTv2 on SmolLM2) rewrites prompt.json.

Every file is written to a temporary name, fsynced, then renamed; parts go first, then
state.json, which names the parts it needs; parts no longer named are removed last. So a kill at
any moment leaves either the previous checkpoint or the new one, each with all its parts.
Checkpoints of earlier versions (RUN/state.pkl) are refused with the way on (`LEGACY_FILE`).
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bbt.errors import ConfigError
from bbt.optimizer import CMAES
from bbt.prompt import Prompt
from bbt.protocol import ProjectionSpec, TaskSpec
from bbt.tuner import Evaluation, TuneState
from bbt.verbalizers import Choice

# 5: a finished search's state without its CMA-ES; 4: the path as changed layers; 3: as whole z (4 and 3
# still read); 1 and 2: RUN/state.pkl (refused)
FORMAT = 5
READS = (3, 4, 5)
LEGACY_FILE = "state.pkl"


@dataclass
class RunState:
    """What a checkpoint holds: the no-prompt baseline (scored first) and the search after its last generation."""

    plain: Evaluation
    ledger_step: int  # where the ledger stands when `tuning` is None
    tuning: TuneState | None = None
    choice: Choice | None = None  # verbalizer auto: what was chosen, before the search
    chosen_plain: Evaluation | None = None  # the model without a soft prompt, read through the chosen words


def parts_dir(path: str | Path) -> Path:
    """Where the checkpoint at `path` keeps its CMA-ES states and arrays."""
    return Path(path).with_suffix(".parts")


# ---- the JSON form ------------------------------------------------------------------------------

def _evaluation(e: Evaluation | None) -> dict | None:
    return None if e is None else asdict(e)


def _evaluation_of(d: dict | None) -> Evaluation | None:
    return None if d is None else Evaluation(**d)


def _encode(state: RunState, arrays: dict[str, np.ndarray], optimizers: list[CMAES]) -> dict:
    """`state` as JSON; its arrays go into `arrays` and its CMA-ES into `optimizers`, named by key and position."""
    out = {"plain": _evaluation(state.plain), "ledger_step": state.ledger_step,
           "chosen_plain": _evaluation(state.chosen_plain), "choice": None, "tuning": None}
    if state.choice is not None:
        c = state.choice
        out["choice"] = {"task": c.task.model_dump(mode="json"), "label_words": c.label_words,
                         "held_out": {str(k): v for k, v in c.held_out.items()},
                         "beats_own": {str(k): v for k, v in c.beats_own.items()}, "queries": c.queries}
    s = state.tuning
    if s is not None:
        p = s.prompt
        arrays["prompt_z"], arrays["best_z"] = p.z, s.best_z
        if s.local_base is not None:
            arrays["local_base"] = s.local_base
        path_layers = []
        if s.path:
            arrays["path_rows"], path_layers = _path_changes([z for _, z in s.path])
        if s.stop_reason is None:  # a finished search needs none of them again (TuneState.stop_reason)
            optimizers += s.optimizers
        out["tuning"] = {
            "prompt": {"projections": [spec.model_dump(mode="json") for spec in p.projections],
                       "prompt_length": p.prompt_length, "init_seed": p.init_seed, "init_text": p.init_text},
            "optimizers": len(optimizers), "stop_reason": s.stop_reason,
            "best_train": _evaluation(s.best_train), "best_dev": _evaluation(s.best_dev),
            "chosen_train": _evaluation(s.chosen_train), "generation": s.generation, "seconds": s.seconds,
            "ledger_step": s.ledger_step, "history": s.history, "path_queries": [q for q, _ in s.path],
            "path_layers": path_layers,
            "stage": s.stage, "local_losses": s.local_losses, "fold": s.fold, "fold_start": s.fold_start,
            "chosen_fold": s.chosen_fold,
        }
    return out


def _decode(data: dict, arrays: dict[str, np.ndarray], optimizers: list[CMAES]) -> RunState:
    choice = None
    if data["choice"] is not None:
        c = data["choice"]
        choice = Choice(task=TaskSpec.model_validate(c["task"]), label_words=c["label_words"],
                        held_out={int(k): v for k, v in c["held_out"].items()},
                        beats_own={int(k): v for k, v in c["beats_own"].items()}, queries=c["queries"])
    tuning = None
    if data["tuning"] is not None:
        t = data["tuning"]
        p = t["prompt"]
        prompt = Prompt(z=arrays["prompt_z"], projections=[ProjectionSpec.model_validate(s) for s in p["projections"]],
                        prompt_length=p["prompt_length"], init_seed=p["init_seed"], init_text=p["init_text"])
        if "path_layers" in t:
            path_z = _path_points(arrays.get("path_rows"), t["path_layers"])
        else:  # format 3: every point whole
            path_z = arrays.get("path_z")
        tuning = TuneState(
            prompt=prompt, optimizers=optimizers[: t["optimizers"]], best_z=arrays["best_z"],
            best_train=_evaluation_of(t["best_train"]), best_dev=_evaluation_of(t["best_dev"]),
            chosen_train=_evaluation_of(t["chosen_train"]), generation=t["generation"], seconds=t["seconds"],
            ledger_step=t["ledger_step"], history=t["history"],
            path=[(q, path_z[i].copy()) for i, q in enumerate(t["path_queries"])], stage=t["stage"],
            local_base=arrays.get("local_base"), local_losses=t["local_losses"], fold=t["fold"],
            fold_start=t["fold_start"], chosen_fold=t["chosen_fold"], stop_reason=t.get("stop_reason"))
    return RunState(plain=_evaluation_of(data["plain"]), ledger_step=data["ledger_step"], tuning=tuning,
                    choice=choice, chosen_plain=_evaluation_of(data["chosen_plain"]))


def _path_changes(points: list[np.ndarray]) -> tuple[np.ndarray, list[list[int]]]:
    """The path's z points [layers, d] as the rows each changed from the one before (the first: all
    of them) stacked [rows, d], and which layers those rows are, point by point."""
    rows, layers, previous = [], [], None
    for z in points:
        changed = range(len(z)) if previous is None else np.flatnonzero((z != previous).any(axis=1)).tolist()
        layers.append(list(changed))
        rows += [z[i] for i in changed]
        previous = z
    return np.stack(rows), layers


def _path_points(rows: np.ndarray | None, layers: list[list[int]]) -> list[np.ndarray]:
    """`_path_changes` undone: each point's whole z."""
    points, z, at = [], None, 0
    for changed in layers:
        z = np.empty((len(changed), rows.shape[1])) if z is None else z.copy()
        for i in changed:
            z[i] = rows[at]
            at += 1
        points.append(z)
    return points


def _plain(value):
    """JSON for the numpy scalars a generation's log record may hold."""
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"{type(value).__name__} is not JSON")


# ---- files --------------------------------------------------------------------------------------

def _write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    """Make renames in `folder` durable (POSIX: fsync the directory; a no-op where that is refused)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fingerprint(es: CMAES) -> str:
    """Changes whenever the optimizer's state can have: a `tell` (generation) or an `ask` (its sampler)."""
    sampler = repr(es.es.opts["randn"].rng.bit_generator.state).encode()
    return f"g{es.generation}-{hashlib.blake2b(sampler, digest_size=6).hexdigest()}"


def _put(parts: Path, name: str, data: bytes | None = None, make=None) -> str:
    """Write part `name` unless it is there already (its name says its content); returns the name."""
    if not (parts / name).exists():
        parts.mkdir(exist_ok=True)
        _write(parts / name, data if data is not None else make())
    return name


def save(path: str | Path, state: RunState) -> None:
    """Write `state` to `path` atomically and durably (its CMA-ES states and arrays under `parts_dir(path)`)."""
    from safetensors.numpy import save as to_safetensors

    path, parts = Path(path), parts_dir(path)
    arrays, optimizers = {}, []
    data = _encode(state, arrays, optimizers)
    names = [_put(parts, f"{i}-{_fingerprint(es)}.pkl", make=lambda es=es: pickle.dumps(es.es, pickle.HIGHEST_PROTOCOL))
             for i, es in enumerate(optimizers)]
    if arrays:
        blob = to_safetensors({k: np.ascontiguousarray(v, dtype=np.float64) for k, v in arrays.items()})
        names.append(_put(parts, f"arrays-{hashlib.blake2b(blob, digest_size=8).hexdigest()}.safetensors", blob))
    if names:
        _fsync_dir(parts)
    document = {"format": FORMAT, "optimizers": names[: len(optimizers)],
                "arrays": names[-1] if arrays else None, "state": data}
    _write(path, json.dumps(document, default=_plain).encode())  # Infinity where a loss is still unmeasured
    _fsync_dir(path.parent)
    if parts.is_dir():  # parts of earlier checkpoints (and temporary files of a killed write)
        keep = set(names)
        for old in parts.iterdir():
            if old.name not in keep:
                old.unlink(missing_ok=True)


def load(path: str | Path) -> RunState | None:
    """The state saved at `path`, or None when there is none yet (a run killed before its first generation)."""
    from safetensors.numpy import load as from_safetensors

    path, parts = Path(path), parts_dir(path)
    legacy = path.with_name(LEGACY_FILE)
    if not path.exists():
        if legacy.exists():
            raise ConfigError(f"{legacy} is a checkpoint of an earlier bbt, which pickled its classes; this version "
                              "reads only its own JSON checkpoints (state.json)")
        return None
    try:
        document = json.loads(path.read_text())
        if document.get("format") not in READS:
            raise ValueError(f"format {document.get('format')}, this bbt reads {', '.join(map(str, READS))}")
        optimizers = [CMAES.from_state(pickle.loads((parts / name).read_bytes())) for name in document["optimizers"]]
        stored = {} if document["arrays"] is None else from_safetensors((parts / document["arrays"]).read_bytes())
        arrays = {k: np.array(v) for k, v in stored.items()}  # own, writable copies: the search updates them
        return _decode(document["state"], arrays, optimizers)
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise ConfigError(f"cannot read the checkpoint {path}: {exc}") from None


def files(path: str | Path) -> list[Path]:
    """Everything a checkpoint at `path` may occupy: the file and its parts, and those of a
    checkpoint of an earlier bbt beside it."""
    path = Path(path)
    return [path, parts_dir(path), path.with_name(LEGACY_FILE), path.with_name(LEGACY_FILE + ".parts")]


def remove(path: str | Path) -> None:
    """Delete everything the checkpoint at `path` occupies (`files`)."""
    for f in files(path):
        if f.is_dir():
            shutil.rmtree(f, ignore_errors=True)
        else:
            f.unlink(missing_ok=True)
