"""Grids of runs: tasks x seeds x methods x settings, each cell a run folder, scored at several budgets.

    SWEEP/sweep.json              the grid, versioned (what a rerun must match)
    SWEEP/cells/NAME/             one run folder per cell, as `bbt tune` writes it
    SWEEP/cells/NAME/scores.json  the cell's rows: test metric at each budget, the no-prompt baseline
    SWEEP/cells/NAME.claim        held while a worker runs the cell (pid, host)

A cell runs once, to the largest budget; its score at a smaller budget is that of the prompt the
run would have returned then (RUN/path.json), so scoring at 100, 200 and 500 queries costs one
run to 500. A cell with scores.json is done and skipped; one cut mid-run resumes from its
checkpoint; a cell claimed by a live worker is left to it, so two sweeps on one folder never
run a cell twice. Cells run in this process, in `workers` local processes, or as Ray tasks.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bbt import jsonfile, metrics, rundir
from bbt.budget import Budget
from bbt.config import DEFAULT_MODEL, GRADIENT_METHODS, TuneConfig
from bbt.errors import ConfigError

SWEEP_FILE = "sweep.json"
SWEEP_VERSION = 2  # 2: --verbalizer auto is a default; the runs of a version-1 grid read each task's own words
SCORES_FILE = "scores.json"


@dataclass(frozen=True)
class Cell:
    task: str
    seed: int
    method: str
    settings: tuple[tuple[str, object], ...] = ()  # TuneConfig fields this cell sets, sorted

    @property
    def name(self) -> str:
        base = f"{self.task}-s{self.seed}-{self.method}"
        if not self.settings:
            return base
        text = "-".join(f"{k}{v}" for k, v in self.settings)
        short = "".join(c if c.isalnum() or c in ".-" else "_" for c in text)[:40]
        return f"{base}-{short}-{hashlib.sha1(text.encode()).hexdigest()[:6]}"


@dataclass
class SweepSpec:
    """What a sweep runs. `grid` maps TuneConfig fields to lists of values (the settings axis)."""

    tasks: list[str]
    seeds: list[int]
    methods: list[str] = field(default_factory=lambda: ["bbt"])
    budgets: list[int] = field(default_factory=lambda: [500])
    data_root: str = ""
    model: str = DEFAULT_MODEL
    settings: dict = field(default_factory=dict)  # fixed TuneConfig fields for every cell
    grid: dict = field(default_factory=dict)  # field -> list of values
    test_limit: int | None = 500
    endpoints: list[str] = field(default_factory=list)
    api_key: str | None = None
    dtype: str = "float32"  # the precision of a model run in the sweep's processes (an endpoint runs its own)

    def cells(self) -> list[Cell]:
        keys = sorted(self.grid)
        combos = list(itertools.product(*(self.grid[k] for k in keys))) or [()]
        return [Cell(t, s, m, tuple(zip(keys, combo))) for t in self.tasks for s in self.seeds for m in self.methods
                for combo in combos]

    def config(self, cell: Cell) -> TuneConfig:
        fields = {**self.settings, **dict(cell.settings), "model": self.model, "method": cell.method, "seed": cell.seed}
        if cell.method not in GRADIENT_METHODS:
            fields["budget"] = Budget(queries=max(self.budgets))
        return TuneConfig(**fields)

    def check(self) -> None:
        if not self.tasks or not self.seeds or not self.methods or not self.budgets:
            raise ConfigError("a sweep needs at least one task, seed, method and budget")
        for cell in self.cells()[:1]:
            self.config(cell)  # a bad setting fails here, before anything runs


def load_spec(out: Path) -> SweepSpec:
    try:
        data = json.loads((out / SWEEP_FILE).read_text())
    except FileNotFoundError:
        raise ConfigError(f"{out} is not a sweep folder ({SWEEP_FILE} is missing): run bbt sweep --out {out} first") from None
    data = _upgraded(data)
    data.pop("version", None)
    return SweepSpec(**data)


def _upgraded(data: dict) -> dict:
    """sweep.json of an earlier version as this one reads it. A version-1 grid that set no verbalizer
    ran every cell through the task's own words, the default then: its cells still mean that."""
    settings = data.get("settings", {})
    if data.get("version", 1) < 2 and "verbalizer" not in settings and "verbalizer" not in data.get("grid", {}):
        data = {**data, "settings": {**settings, "verbalizer": "manual"}}
    return {"dtype": "float32", **data, "version": SWEEP_VERSION}  # sweeps from before --dtype ran in float32


def _save_spec(out: Path, spec: SweepSpec) -> None:
    """sweep.json; a folder holding another grid is refused (its cells would not mean what they say)."""
    path = out / SWEEP_FILE
    mine = {"version": SWEEP_VERSION, **asdict(spec)}
    mine.pop("api_key")  # a secret: never on disk
    if path.exists():
        stored = json.loads(path.read_text())
        theirs = _upgraded(stored)
        if {k: v for k, v in theirs.items() if k != "endpoints"} != {k: v for k, v in mine.items() if k != "endpoints"}:
            hint = ""
            if theirs["settings"].get("verbalizer") != mine["settings"].get("verbalizer") and stored.get("version", 1) < 2:
                hint = (" It was made by an earlier bbt, whose runs read each task through its own words: continue it "
                        "with --set verbalizer=manual.")
            raise ConfigError(f"{out} holds a different sweep ({path}); pick another --out, or rerun it as it was.{hint}")
        if stored != mine:  # an earlier version's file, now in this version's terms
            path.write_text(json.dumps(mine, indent=2))
        return
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(mine, indent=2))


# ---- claims -------------------------------------------------------------------------------------

def claim(path: Path) -> bool:
    """Take the claim file `path` (True), or leave it to a live owner (False). A claim whose owner
    on this host is dead is taken over."""
    me = json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "time": time.time()})
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                owner = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                owner = {}
            if not rundir.owner_alive(owner):
                path.unlink(missing_ok=True)  # its worker died: the cell resumes from its checkpoint
                continue
            return False
        with os.fdopen(fd, "w") as f:
            f.write(me)
        return True
    return False


# ---- one cell -----------------------------------------------------------------------------------

def _backend(spec: SweepSpec, cell_index: int):
    """The backend a cell runs against: an endpoint (round robin over cells) or this process, behind the cache."""
    from bbt.backends.endpoints import open_backend
    from bbt.cache import with_cache

    endpoint = spec.endpoints[cell_index % len(spec.endpoints)] if spec.endpoints else None
    return with_cache(open_backend(endpoint, api_key=spec.api_key, dtype=spec.dtype), warn=print)


def run_cell(spec: SweepSpec, cell: Cell, out: Path, backend, log=lambda *a: None) -> list[dict] | None:
    """Run one cell (unless another worker holds it) and write its scores; its rows, or None if left to another."""
    from bbt.data import limit_test, load_task_folder
    from bbt import api
    from bbt.rundir import Origin, is_run, load_artifact, prompt_at, read_metrics
    from bbt.scoring import evaluate_split
    from bbt.session import Session
    from bbt.tasks import BUILTIN_TASKS, for_family, resolve_task

    folder = out / "cells" / cell.name
    if (folder / SCORES_FILE).exists():
        return json.loads((folder / SCORES_FILE).read_text())
    folder.parent.mkdir(parents=True, exist_ok=True)
    claim_file = folder.parent / f"{cell.name}.claim"
    if not claim(claim_file):
        return None
    try:
        cfg = spec.config(cell)
        data_dir = Path(spec.data_root) / cell.task
        # a built-in name takes bbt's template; any other folder brings its own task.json
        task = resolve_task(cell.task if cell.task in BUILTIN_TASKS else None, data_dir)
        task = for_family(task, backend.model_info(cfg.model).family)
        data = load_task_folder(data_dir, task, seed=cell.seed, k=cfg.k_shot, skip_bad_rows=cfg.skip_bad_rows)
        data = limit_test(data, spec.test_limit)
        origin = Origin(data=str(data_dir.resolve()), dtype=backend.model_info(cfg.model).dtype,
                        test_limit=spec.test_limit)
        context = {**origin.record(), "sweep": str(out), "cell": cell.name}
        key = "test_acc" if task.metric == "acc" else "test_f1"
        plain_key = "no_prompt_test_acc" if task.metric == "acc" else "no_prompt_test_f1"
        base = {"cell": cell.name, "task": cell.task, "seed": cell.seed, "method": cell.method,
                "settings": dict(cell.settings), "metric": task.metric, "test_split": data.test_name,
                "test_examples": len(data.test)}
        if cell.method in GRADIENT_METHODS:
            m = read_metrics(folder)
            if m is None:
                if is_run(folder):
                    import shutil

                    shutil.rmtree(folder)  # a gradient run cut short starts over: it has no checkpoint
                m = api.tune(cfg, task, data, backend, folder, context=context, log=log)
            rows = [{**base, "budget": None, "test": m[key], "no_prompt": m[plain_key], "queries_used": 0,
                     "backward_passes": m["backward_passes"]}]
        else:
            m = api.tune(cfg, task, data, backend, folder, context=context, log=log, resume=is_run(folder))
            rows, scored = [], {}
            task = load_artifact(folder).task  # as the run read it (--verbalizer auto chooses its words)
            for b in sorted(spec.budgets):
                prompt = prompt_at(folder, b)
                z = prompt.z.tobytes()
                if z not in scored:
                    ev, _ = evaluate_split(Session(backend, cfg.model), task, data.test, prompt)
                    scored[z] = ev.metric
                rows.append({**base, "budget": b, "test": scored[z], "no_prompt": m[plain_key],
                             "queries_used": min(b, m["queries_used"])})
        for r in rows:
            r["queries_paid"] = m.get("queries_paid", 0)
        tmp = folder / (SCORES_FILE + ".tmp")
        tmp.write_text(jsonfile.dumps(rows, indent=1))
        tmp.replace(folder / SCORES_FILE)
        return rows
    finally:
        claim_file.unlink(missing_ok=True)


def _cell_main(spec_dict: dict, cell: Cell, out: str, index: int, threads: int) -> str:
    """A worker's whole job for one cell (a local process or a Ray task): '' on success, else the error."""
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass
    spec = SweepSpec(**spec_dict)
    backend = _backend(spec, index)
    try:
        rows = run_cell(spec, cell, Path(out), backend)
        return "" if rows is not None else "claimed"
    except Exception as exc:  # the cell fails, the sweep goes on; the report says why
        (Path(out) / "cells").mkdir(parents=True, exist_ok=True)
        (Path(out) / "cells" / f"{cell.name}.error").write_text(traceback.format_exc())
        return f"{type(exc).__name__}: {exc}"
    finally:
        backend.close()


# ---- the sweep ----------------------------------------------------------------------------------

@dataclass
class SweepOutcome:
    done: list[str] = field(default_factory=list)  # cells finished (now or before)
    failed: dict[str, str] = field(default_factory=dict)  # cell -> why
    left: list[str] = field(default_factory=list)  # cells another worker held


def run_sweep(spec: SweepSpec, out: str | Path, *, workers: int = 1, ray: str | bool | None = None,
              log: Callable[[str], None] = print) -> SweepOutcome:
    """Run every cell not done yet: in this process (workers=1), in `workers` local processes, or
    as Ray tasks (`ray`: True for a local Ray, or a cluster address). A failed cell does not stop
    the others."""
    spec.check()
    out = Path(out)
    _save_spec(out, spec)
    cells = spec.cells()
    outcome = SweepOutcome()
    todo = []
    for c in cells:
        if (out / "cells" / c.name / SCORES_FILE).exists():
            outcome.done.append(c.name)
        else:
            (out / "cells" / f"{c.name}.error").unlink(missing_ok=True)
            todo.append(c)
    log(f"sweep {out}: {len(cells)} cells, {len(outcome.done)} done, {len(todo)} to run")
    cores = os.cpu_count() or 1
    if ray:
        results = _run_ray(spec, todo, out, ray, log)
    elif workers <= 1:
        results = {}
        for i, c in enumerate(todo):
            log(f"cell {c.name}")
            results[c.name] = _cell_main(asdict(spec), c, str(out), i, cores)
    else:
        results = _run_processes(spec, todo, out, workers, max(1, cores // workers), log)
    for c in todo:
        why = results.get(c.name, "not run")
        if why == "":
            outcome.done.append(c.name)
        elif why == "claimed":
            outcome.left.append(c.name)
        else:
            outcome.failed[c.name] = why
    log(f"sweep {out}: {len(outcome.done)} done, {len(outcome.failed)} failed, {len(outcome.left)} held by another worker")
    for name, why in outcome.failed.items():
        log(f"  failed {name}: {why.splitlines()[-1] if why else why}")
    return outcome


def _run_processes(spec: SweepSpec, todo: list[Cell], out: Path, workers: int, threads: int, log) -> dict[str, str]:
    """At most `workers` cells at a time, each in its own process: a worker that dies fails its cell only."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results: dict[str, str] = {}
    running: dict[str, tuple] = {}
    queue = list(enumerate(todo))
    while queue or running:
        while queue and len(running) < workers:
            i, c = queue.pop(0)
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_process_target, args=(writer, asdict(spec), c, str(out), i, threads))
            p.start()
            writer.close()
            running[c.name] = (p, reader)
            log(f"cell {c.name} (pid {p.pid})")
        time.sleep(0.2)
        for name, (p, reader) in list(running.items()):
            if p.is_alive():
                continue
            p.join()
            try:
                results[name] = reader.recv() if reader.poll() else f"the worker died (exit code {p.exitcode})"
            except EOFError:
                results[name] = f"the worker died (exit code {p.exitcode})"
            del running[name]
    return results


def _process_target(conn, spec_dict, cell, out, index, threads) -> None:
    conn.send(_cell_main(spec_dict, cell, out, index, threads))
    conn.close()


def _run_ray(spec: SweepSpec, todo: list[Cell], out: Path, address: str | bool, log) -> dict[str, str]:
    try:
        import ray
    except ImportError:
        raise ConfigError("--ray needs Ray: pip install 'bbt[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=None if address is True else address, include_dashboard=False, log_to_driver=False)
    cpus = 1 if spec.endpoints else max(1, int(ray.cluster_resources().get("CPU", 1)) // max(1, min(len(todo), 2)))
    remote = ray.remote(num_cpus=cpus, max_retries=0)(_cell_main)
    refs = {c.name: remote.remote(asdict(spec), c, str(out.resolve()), i, cpus) for i, c in enumerate(todo)}
    results = {}
    for name, ref in refs.items():
        try:
            results[name] = ray.get(ref)
        except Exception as exc:  # a task whose worker died
            results[name] = f"{type(exc).__name__}: {exc}"
        log(f"cell {name}: {results[name] or 'done'}")
    return results


# ---- the report ---------------------------------------------------------------------------------

def sweep(tasks: list[str], data_root: str | Path, *, out: str | Path, seeds: list[int] = (13, 42, 87),
          budgets: list[int] = (500,), methods: list[str] = ("bbt",), model: str = DEFAULT_MODEL, workers: int = 1,
          test_limit: int | None = 500, grid: dict | None = None, **settings) -> list[dict]:
    """Run (or finish) a sweep into `out` and return its table (`bbt.sweep`): one dict per task,
    method, settings and budget with `test`, `test_se`, `no_prompt`, `gap`, `gap_se` (points) and
    `seeds`. `settings`: TuneConfig fields for every cell; `grid`: field -> list of values."""
    spec = SweepSpec(tasks=list(tasks), seeds=list(seeds), methods=list(methods), budgets=list(budgets),
                     data_root=str(data_root), model=model, settings=settings, grid=grid or {}, test_limit=test_limit)
    run_sweep(spec, out, workers=workers, log=lambda *a: None)
    return table(out)


def rows(out: str | Path) -> list[dict]:
    """Every finished cell's rows."""
    return [r for path in sorted((Path(out) / "cells").glob(f"*/{SCORES_FILE}")) for r in json.loads(path.read_text())]


def failures(out: str | Path) -> dict[str, str]:
    return {p.name.removesuffix(".error"): p.read_text().strip().splitlines()[-1]
            for p in sorted((Path(out) / "cells").glob("*.error"))}


def unchecked(out: str | Path) -> dict[str, float | None]:
    """Finished black-box cells whose prompt failed the held-out check (metrics.json's
    `held_out_check`), each with its `above_chance` in standard errors."""
    found = {}
    for path in sorted((Path(out) / "cells").glob("*/metrics.json")):
        check = json.loads(path.read_text()).get("held_out_check")
        if check is not None and not check["passed"]:
            found[path.parent.name] = check["above_chance"]
    return found


def describe_unchecked(out: str | Path) -> str | None:
    """One line naming the cells that failed the held-out check, or None."""
    found = unchecked(out)
    if not found:
        return None
    cells = ", ".join(f"{name} ({'-' if t is None else f'{t:.2f}'})" for name, t in found.items())
    return (f"held-out check failed in {len(found)} cell(s), prompts no better than a blind guess on their held-out "
            f"split (standard errors below the guess's cross-entropy; {metrics.CHANCE_MARGIN} needed): {cells}. Their gains "
            "are not to be trusted.")


def mean_se(xs: list[float]) -> tuple[float, float]:
    """Mean and standard error of the mean (0 for a single value)."""
    a = np.asarray(xs, dtype=float)
    return float(a.mean()), float(a.std(ddof=1) / np.sqrt(len(a))) if len(a) > 1 else 0.0


def table(out: str | Path) -> list[dict]:
    """One line per (task, method, settings, budget): mean and standard error over seeds, in points,
    with the no-prompt baseline and the paired gap to it. `settings` are the cell's grid axes;
    `fixed` the sweep's settings for every cell (`--set`), which a cell's rows do not record."""
    fixed = load_spec(Path(out)).settings if (Path(out) / SWEEP_FILE).exists() else {}
    groups: dict[tuple, list[dict]] = {}
    for r in rows(out):
        key = (r["task"], r["method"], json.dumps(r["settings"], sort_keys=True), r["budget"] or 0)
        groups.setdefault(key, []).append(r)
    lines = []
    for (task, method, settings, budget), rs in sorted(groups.items()):
        test, se = mean_se([100 * r["test"] for r in rs])
        plain, plain_se = mean_se([100 * r["no_prompt"] for r in rs])
        gap, gap_se = mean_se([100 * (r["test"] - r["no_prompt"]) for r in rs])
        lines.append({"task": task, "method": method, "settings": json.loads(settings), "budget": budget or None,
                      "seeds": sorted(r["seed"] for r in rs), "test": test, "test_se": se, "no_prompt": plain,
                      "no_prompt_se": plain_se, "gap": gap, "gap_se": gap_se, "metric": rs[0]["metric"],
                      "fixed": fixed})
    return lines


def format_table(lines: list[dict]) -> str:
    w = max([8, *(len(x["task"]) for x in lines)])  # user tasks have names of any length
    head = f"{'task':{w}s} {'method':14s} {'settings':22s} {'budget':>7s} {'test':>13s} {'no prompt':>13s} {'gap':>13s} seeds"
    fixed = lines[0].get("fixed") if lines else None
    out = ([f"every cell: {', '.join(f'{k}={v}' for k, v in fixed.items())}"] if fixed else []) + [head]
    for x in lines:
        settings = ",".join(f"{k}={v}" for k, v in x["settings"].items()) or "-"
        out.append(f"{x['task']:{w}s} {x['method']:14s} {settings[:22]:22s} {str(x['budget'] or '-'):>7s} "
                   f"{x['test']:6.1f} ± {x['test_se']:4.1f} {x['no_prompt']:6.1f} ± {x['no_prompt_se']:4.1f} "
                   f"{x['gap']:+6.1f} ± {x['gap_se']:4.1f} {','.join(map(str, x['seeds']))}")
    return "\n".join(out)


def write_csv(lines: list[dict], path: str | Path) -> None:
    import csv

    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["task", "method", "settings", "fixed", "budget", "metric", "test", "test_se", "no_prompt",
                    "no_prompt_se", "gap", "gap_se", "seeds"])
        for x in lines:
            w.writerow([x["task"], x["method"], json.dumps(x["settings"], sort_keys=True),
                        json.dumps(x.get("fixed", {}), sort_keys=True), x["budget"] or "",
                        x["metric"], f"{x['test']:.2f}", f"{x['test_se']:.2f}", f"{x['no_prompt']:.2f}",
                        f"{x['no_prompt_se']:.2f}", f"{x['gap']:.2f}", f"{x['gap_se']:.2f}",
                        " ".join(map(str, x["seeds"]))])


def plot(lines: list[dict], path: str | Path) -> None:
    """Test metric against queries, one line per (task, method, settings), a band of ± one
    standard error over seeds; the no-prompt model dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = sorted({x["task"] for x in lines})
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        series: dict[str, list[dict]] = {}
        for x in lines:
            if x["task"] == task and x["budget"]:
                label = x["method"] + "".join(f" {k}={v}" for k, v in x["settings"].items())
                series.setdefault(label, []).append(x)
        for label, xs in series.items():
            xs.sort(key=lambda x: x["budget"])
            q = [x["budget"] for x in xs]
            m = np.array([x["test"] for x in xs])
            se = np.array([x["test_se"] for x in xs])
            ax.plot(q, m, marker="o", label=label)
            ax.fill_between(q, m - se, m + se, alpha=0.2)
        plain = [x["no_prompt"] for x in lines if x["task"] == task]
        if plain:
            ax.axhline(float(np.mean(plain)), color="gray", linestyle="--", label="no prompt")
        ax.set_title(task)
        ax.set_xlabel("queries")
        ax.set_ylabel("test metric (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
