"""The state of a tuning run on disk (RUN/state.pkl), replaced atomically after every generation.

What `bbt tune --resume RUN` continues from: every CMA-ES (with its private sampler), the best
prompts so far, the projection specs, the generation count and where the run stands in its ledger.

Each CMA-ES is kept in a file of its own under RUN/state.pkl.parts/, named by its position and a
fingerprint of its state, and written only when that state has changed. BBTv2 keeps one CMA-ES
per layer (d = 500: about 4 MB each, covariance and eigenbasis) and a generation moves only one
of them, so a checkpoint of SmolLM2's 30 layers writes 4 MB instead of 130 MB.

Every file is written to a temporary name, fsynced, then renamed; parts go first, then state.pkl,
which names the parts it needs; parts no longer named are removed last. So a kill at any moment
leaves either the previous checkpoint or the new one, each with all its parts, never half of one.

It is a pickle (pycma's state has no other complete form): load only checkpoints your own runs
wrote, as with any pickle.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import shutil
from pathlib import Path

from bbt.errors import ConfigError
from bbt.optimizer import CMAES

FORMAT = 2  # 1: every CMA-ES inside state.pkl (still read)


def parts_dir(path: str | Path) -> Path:
    """Where the checkpoint at `path` keeps its CMA-ES states."""
    path = Path(path)
    return path.with_name(path.name + ".parts")


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


class _Pickler(pickle.Pickler):
    """Pickles each CMAES out of line, as a part file, reusing a part already on disk for the same state."""

    def __init__(self, file, parts: Path):
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.parts, self.names = parts, []

    def persistent_id(self, obj):
        if not isinstance(obj, CMAES):
            return None
        name = f"{len(self.names)}-{_fingerprint(obj)}.pkl"
        self.names.append(name)
        if not (self.parts / name).exists():
            self.parts.mkdir(exist_ok=True)
            _write(self.parts / name, pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return name


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, parts: Path):
        super().__init__(file)
        self.parts = parts

    def persistent_load(self, pid):
        return pickle.loads((self.parts / pid).read_bytes())


def _fingerprint(es: CMAES) -> str:
    """Changes whenever the optimizer's state can have: a `tell` (generation) or an `ask` (its sampler)."""
    sampler = repr(es.es.opts["randn"].rng.bit_generator.state).encode()
    return f"g{es.generation}-{hashlib.blake2b(sampler, digest_size=6).hexdigest()}"


def save(path: str | Path, state: object) -> None:
    """Write `state` to `path` atomically and durably (its CMA-ES states under `parts_dir(path)`)."""
    path, parts = Path(path), parts_dir(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickler = _Pickler(f, parts)
        pickler.dump({"format": FORMAT, "state": state})
        f.flush()
        os.fsync(f.fileno())
    if pickler.names:
        _fsync_dir(parts)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    if parts.is_dir():  # parts of earlier checkpoints (and temporary files of a killed write)
        keep = set(pickler.names)
        for old in parts.iterdir():
            if old.name not in keep:
                old.unlink(missing_ok=True)


def load(path: str | Path) -> object | None:
    """The state saved at `path`, or None when there is none yet (a run killed before its first generation)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with path.open("rb") as f:
            saved = _Unpickler(f, parts_dir(path)).load()
        if saved["format"] not in (1, FORMAT):
            raise ValueError(f"format {saved['format']}, this bbt reads 1 and {FORMAT}")
        return saved["state"]
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise ConfigError(f"cannot read the checkpoint {path}: {exc}") from None


def remove(path: str | Path) -> None:
    """Delete the checkpoint at `path` and its parts (nothing to delete is fine)."""
    Path(path).unlink(missing_ok=True)
    shutil.rmtree(parts_dir(path), ignore_errors=True)
