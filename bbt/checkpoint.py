"""The state of a tuning run on disk (RUN/state.pkl), replaced atomically after every generation.

What `bbt tune --resume RUN` continues from: every CMA-ES (with its private sampler), the best
prompts so far, the projection specs, the generation count and where the run stands in its ledger.
The file is written to a temporary name, fsynced, then renamed over the old one, so a kill at any
moment leaves either the previous checkpoint or the new one, never half of one.

It is a pickle (pycma's state has no other complete form): load only checkpoints your own runs
wrote, as with any pickle.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

from bbt.errors import ConfigError

FORMAT = 1


def save(path: str | Path, state: object) -> None:
    """Write `state` to `path` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as f:
        pickle.dump({"format": FORMAT, "state": state}, f, protocol=pickle.HIGHEST_PROTOCOL)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable (POSIX: fsync the directory)
        fd = os.open(path.parent, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def load(path: str | Path) -> object | None:
    """The state saved at `path`, or None when there is none yet (a run killed before its first generation)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        saved = pickle.loads(path.read_bytes())
        if saved["format"] != FORMAT:
            raise ValueError(f"format {saved['format']}, this bbt reads {FORMAT}")
        return saved["state"]
    except Exception as exc:  # noqa: BLE001 - any unreadable checkpoint gets the same clear message
        raise ConfigError(f"cannot read the checkpoint {path}: {exc}") from None
