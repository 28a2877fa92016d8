"""`bbt watch`: a live view of a run or a sweep, read from its folder as it grows.

A run folder says everything a view needs: config.json (the budget), log.jsonl (one line per
generation or epoch) and metrics.json (written last, when the run ends). The view shows the
loss and dev score against queries, the budget spent and left, queries per second and when
tuning should end at that speed; it redraws as the log grows and returns when the run ends, or
when no process tunes it any more (RUN/running.json names none alive: it stopped). A
sweep folder shows one line per cell. A folder where no run has started yet is waited for a while
(`wait` seconds); one that holds something else is refused.
"""

from __future__ import annotations

import difflib
import json
import time
from pathlib import Path

from bbt import rundir
from bbt.errors import BBTError, ConfigError

_BLOCKS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 48) -> str:
    """Values as a line of block characters (lower is lower), the last `width` of them."""
    values = [v for v in values if v is not None][-width:]
    if not values:
        return ""
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0
    return "".join(_BLOCKS[min(len(_BLOCKS) - 1, int((v - lo) / span * (len(_BLOCKS) - 1) + 0.5))] for v in values)


def _lines(path: Path) -> list[dict]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            break
    return out


def run_snapshot(run: str | Path) -> dict:
    """Where a run stands: status, queries used and budget, the loss and dev curves, speed, and its
    metrics once it has ended."""
    run = Path(run)
    try:
        config = json.loads((run / rundir.CONFIG_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {"status": "not started", "run": str(run)}
    cfg = config.get("config", {})
    log = _lines(run / rundir.LOG_FILE)
    metrics = rundir.read_metrics(run)
    gradient = bool(log) and "epoch" in log[-1]
    last = log[-1] if log else {}
    snap = {
        # a run no live process tunes has stopped: it failed, was interrupted or killed (--resume continues it)
        "run": str(run), "status": "done" if metrics else "running" if rundir.being_tuned(run) else "stopped",
        "method": cfg.get("method"),
        "model": cfg.get("model"), "task": config.get("task", {}).get("name"),
        "budget": (cfg.get("budget") or {}).get("queries"), "steps": len(log),
        "queries_used": last.get("queries_used", 0), "seconds": last.get("seconds", 0.0),
        "loss": [r.get("train_loss" if gradient else "loss_min") for r in log],
        "best_loss": last.get("best_train_loss", last.get("train_loss")),
        "best_dev": last.get("best_dev_metric", max((r.get("dev_metric", 0) for r in log), default=None)),
        "dev": [r.get("best_dev_metric", r.get("dev_metric")) for r in log],
        "metrics": metrics, "unit": "epoch" if gradient else "generation",
    }
    snap["qps"] = snap["queries_used"] / snap["seconds"] if snap["seconds"] else None
    left = (snap["budget"] or 0) - snap["queries_used"]
    # seconds of tuning left at the speed so far (the test split is scored after it)
    snap["eta"] = left / snap["qps"] if snap["status"] == "running" and snap["qps"] and left > 0 else None
    return snap


def sweep_snapshot(folder: str | Path) -> list[dict]:
    """One line per cell of a sweep: done, running (claimed), failed or waiting, and its progress."""
    from bbt import sweeps

    folder = Path(folder)
    spec = sweeps.load_spec(folder)
    out = []
    for cell in spec.cells():
        cdir = folder / "cells" / cell.name
        snap = run_snapshot(cdir)
        if (cdir / sweeps.SCORES_FILE).exists():
            snap["status"] = "done"
        elif (folder / "cells" / f"{cell.name}.error").exists():
            snap["status"] = "failed"
        elif (folder / "cells" / f"{cell.name}.claim").exists():
            snap["status"] = "running"
        elif snap["status"] != "not started":
            snap["status"] = "stopped"
        snap["cell"] = cell.name
        out.append(snap)
    return out


def _run_view(snap: dict):
    from rich.table import Table

    t = Table(title=f"{snap.get('task')} · {snap.get('method')} · {snap.get('model')} · {snap['status']}",
              show_header=False, expand=False)
    budget = snap.get("budget")
    used = snap.get("queries_used", 0)
    if snap.get("unit") == "epoch":
        t.add_row("epochs", str(snap["steps"]))
    else:
        t.add_row("queries", f"{used} / {budget}  ({budget - used} left)" if budget else str(used))
        if budget:
            done = int(30 * used / budget)
            t.add_row("spent", "█" * done + "░" * (30 - done))
    if snap.get("qps"):
        t.add_row("queries/s", f"{snap['qps']:.2f}")
    if snap.get("eta") is not None:
        t.add_row("ETA", f"{_clock(snap['eta'])}  (tuning ends at this speed; the test split is scored after)")
    if snap.get("best_loss") is not None:
        t.add_row("best train loss", f"{snap['best_loss']:.4f}")
    if snap.get("best_dev") is not None:
        t.add_row("best dev", f"{snap['best_dev']:.4f}")
    t.add_row(f"loss per {snap.get('unit', 'generation')}", sparkline(snap.get("loss", [])))
    t.add_row("dev", sparkline(snap.get("dev", [])))
    m = snap.get("metrics")
    if m:
        t.add_row("test", f"{m['test_acc']:.4f}  (no prompt {m['no_prompt_test_acc']:.4f})")
    return t


def _sweep_view(cells: list[dict]):
    from rich.table import Table

    t = Table(title=f"sweep: {sum(c['status'] == 'done' for c in cells)}/{len(cells)} cells done")
    for col in ("cell", "status", "queries", "best dev", "loss"):
        t.add_column(col)
    for c in cells:
        q = f"{c.get('queries_used', 0)}/{c.get('budget') or '-'}" if c["status"] != "not started" else "-"
        dev = f"{c['best_dev']:.3f}" if c.get("best_dev") is not None else "-"
        t.add_row(c["cell"], c["status"], q, dev, sparkline(c.get("loss", []), 24))
    return t


def _clock(seconds: float) -> str:
    """h:mm:ss (m:ss under an hour)."""
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def folder_kind(path: Path) -> str | None:
    """'run' or 'sweep' by the files in `path`; None where nothing has started yet (no folder, or an
    empty one); a ConfigError for a folder that holds something else."""
    from bbt import sweeps

    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not a run or sweep folder")
    if (path / sweeps.SWEEP_FILE).exists():
        return "sweep"
    if rundir.is_run(path):
        return "run"
    if (path / rundir.INDEX_FILE).exists():
        raise ConfigError(f"{path} is an ensemble folder: watch its members, e.g. bbt watch {path / 'member-1'}")
    if (path / rundir.OWNER_FILE).exists():
        return None  # a run starting: its process named itself, its config.json comes next
    if path.is_dir() and any(path.iterdir()):
        runs = sorted(p.name for p in path.iterdir() if rundir.is_run(p) or (p / sweeps.SWEEP_FILE).exists())
        inside = f"; runs in it: {', '.join(runs[:5])}{', ...' if len(runs) > 5 else ''}" if runs else ""
        raise ConfigError(f"{path} is not a run or sweep folder: it has no config.json or sweep.json{inside}")
    return None


def _no_run(path: Path, why: str) -> ConfigError:
    names = [p.name for p in path.parent.iterdir() if p.is_dir()] if path.parent.is_dir() else []
    near = difflib.get_close_matches(path.name, names, n=3)
    hint = f" (did you mean {' or '.join(str(path.parent / n) for n in near)}?)" if near else ""
    return ConfigError(f"no run at {path}: {why}{hint}")


def _wait_for_run(path: Path, wait: float, interval: float, console) -> str:
    """The folder's kind once a run or sweep is there, waiting up to `wait` seconds for one to start."""
    kind = folder_kind(path)
    if kind is not None:
        return kind
    if wait <= 0:
        raise _no_run(path, "the folder does not exist" if not path.exists() else "the folder is empty")
    console.print(f"waiting up to {wait:.0f} s for a run to start in {path} (--wait)")
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
        kind = folder_kind(path)
        if kind is not None:
            return kind
    raise _no_run(path, f"none started there within {wait:.0f} s; is the path right?")


def watch(path: str | Path, *, interval: float = 1.0, once: bool = False, console=None,
          wait: float = 60.0) -> dict | list[dict]:
    """Draw the view of a run or sweep folder until it ends (or once); returns the last snapshot.

    A folder where no run has started yet is waited for up to `wait` seconds (not with `once`);
    then, or for a folder that holds something else, a ConfigError."""
    from rich.console import Console
    from rich.live import Live

    path = Path(path)
    console = console or Console()
    is_sweep = _wait_for_run(path, 0 if once else wait, interval, console) == "sweep"

    def take():
        return sweep_snapshot(path) if is_sweep else run_snapshot(path)

    def ended(snap) -> bool:
        if is_sweep:
            return all(c["status"] in ("done", "failed") for c in snap)
        return snap["status"] in ("done", "stopped")

    snap = take()
    view = _sweep_view if is_sweep else _run_view
    if once:
        console.print(view(snap))
        return snap
    with Live(view(snap), console=console, refresh_per_second=4) as live:
        while not ended(snap):
            time.sleep(interval)
            snap = take()
            if not is_sweep and not rundir.is_run(path):  # removed: it failed before spending anything
                raise ConfigError(f"the run at {path} is gone: it stopped before it spent anything")
            live.update(view(snap))
    if not is_sweep and snap["status"] == "stopped":
        raise BBTError(f"the run at {path} stopped before it ended (no process is tuning it: it failed, was "
                       f"interrupted or killed); what it spent is recorded there: continue it with bbt tune --resume {path}")
    return snap
