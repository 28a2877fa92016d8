"""The scripting surface and the one dispatcher: backends, run, evaluate, predict, and `tune`,
where a method is sent to its runner for the CLI, sweeps and the demo alike.

    import bbt

    with bbt.local() as backend:                       # or bbt.remote("http://host:8000", api_key=...)
        m = bbt.run("sst2", "../shared/data/sst2", out="runs/sst2", budget=500, seed=42, backend=backend)
        print(m["no_prompt_test_acc"], "->", m["test_acc"])
        print(bbt.evaluate("runs/sst2", split="dev", backend=backend)["acc"])
        print(bbt.predict("runs/sst2", ["a gripping film"], backend=backend))

Every function takes run folders by path and the budget once (in queries), and returns plain
dicts, as the command line prints them. Without a `backend`, `run` runs the model in this
process, and `resume`, `evaluate` and `predict` go where the run was tuned (the server its
config.json names, else the model in this process, in the run's precision), as the command line
does. Defaults are TuneConfig's and the backends' own, as on the command line. The pieces
underneath (`bbt.tuner.tune`, `bbt.runs.run_tune`, `bbt.ensemble`) stay available for finer control.
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path


from bbt.backends.base import Backend
from bbt.backends.endpoints import open_backend
from bbt.backends.http import TIMEOUT, WAIT
from bbt.budget import Budget
from bbt.config import GRADIENT_METHODS, TuneConfig
from bbt.data import TaskData
from bbt.errors import ConfigError, DataError
from bbt.protocol import TaskSpec
from bbt.rundir import Origin
from bbt.session import Session

# the CLI's --budget default: the papers' (BBT: 8000 queries)
DEFAULT_BUDGET = Budget.model_fields["queries"].default


def local(models: list[str] | None = None, *, device: str = "auto", dtype: str = "float32"):
    """A backend running the models in this process (needs `bbt[server]`), in `dtype` (float32,
    bfloat16 or auto); use it in a `with`."""
    return open_backend(models=models, device=device, dtype=dtype)


def remote(url: str | list[str], *, api_key: str | None = None, timeout: float = TIMEOUT, wait: float = WAIT,
           engine: str = "auto", model_files: str | None = None):
    """A backend for one or more `bbt serve` endpoints over HTTP, or a vLLM server (`engine`: auto
    recognises it; `model_files`: where its tokenizer and input embeddings are); `timeout`: seconds
    for one answer, `wait`: seconds of retries while a server restarts. Use it in a `with`."""
    return open_backend(url, engine=engine, model_files=model_files, api_key=api_key, timeout=timeout, wait=wait)


@contextmanager
def _backend(backend: Backend | None, run: str | Path | None = None):
    """`backend`, or one opened for the block: where `run` was tuned (`_open_origin`), or without
    a run the model in this process."""
    if backend is not None:
        yield backend
        return
    from bbt.rundir import origin_of

    owned = local() if run is None else _open_origin(origin_of(run))
    try:
        yield owned
    finally:
        owned.close()


def _open_origin(origin: Origin, *, api_key: str | None = None, timeout: float = TIMEOUT,
                 wait: float = WAIT) -> Backend:
    """A backend where a run was tuned (`origin`, from its folder): the server (vLLM stays vLLM; it
    has answered this run before, so it gets the whole `wait` from the first request), else the
    model in this process, in the precision the run was paid in."""
    if origin.endpoint:
        return open_backend(origin.endpoint, engine=origin.engine_choice, model_files=origin.model_files,
                            api_key=api_key, timeout=timeout, wait=wait, first_contact_wait=None)
    return open_backend(dtype=origin.dtype)


def tune(cfg: TuneConfig, task: TaskSpec, data: TaskData, backend: Backend, out: str | Path, *,
         ensemble: int | None = None, resume: bool = False, context: dict | None = None, progress: bool = False,
         log=print, report_to: str = "none", replace: bool = False) -> dict:
    """The one dispatcher of a run: `cfg.method` to its runner (a gradient baseline, an ensemble of
    `ensemble` prompts, or one search) writing the run folder `out`; returns its metrics.json.
    `resume`: continue the run in `out`; `replace`: start over in a run folder that exists."""
    from bbt.runs import run_ensemble, run_gradient, run_tune

    if cfg.method in GRADIENT_METHODS:
        if resume or ensemble:
            raise ConfigError(f"--method {cfg.method} runs in one go: --resume and --ensemble are for bbt and bbtv2")
        return run_gradient(cfg, task, data, backend, out, context=context, log=log)
    if ensemble:
        return run_ensemble(cfg, ensemble, task, data, backend, out, context=context, progress=progress, log=log,
                            resume=resume)
    return run_tune(cfg, task, data, backend, out, context=context, progress=progress, log=log, resume=resume,
                    replace=replace, report_to=report_to)


def run(task: str, data: str | Path, *, out: str | Path, budget: int | None = DEFAULT_BUDGET, seed: int = 42,
        backend: Backend | None = None, ensemble: int | None = None, resume: bool = False, progress: bool = False,
        **settings) -> dict:
    """Tune a prompt (or a gradient baseline, `method=...`) on `task` from the folder `data`, into
    the run folder `out`; returns its metrics.json. `budget`: queries (the whole ensemble's with
    `ensemble`; default 8000, the papers' and the CLI's); `settings`: any TuneConfig field
    (method, model, prompt_length, init, ...). `resume`: continue the run in `out` as `resume`
    does; the settings given must be the run's own."""
    from bbt.data import load_task_folder
    from bbt.tasks import resolve_task

    cfg = TuneConfig(seed=seed, budget=Budget(queries=budget), **settings)
    spec = resolve_task(task, data)
    if resume:
        from bbt.api import resume as resume_run  # the keyword hides the function of that name

        _check_same_run(out, cfg, spec, ensemble, given=("seed", "budget", *settings))
        return resume_run(out, backend=backend, progress=progress)
    split = load_task_folder(data, spec, seed=seed, k=cfg.k_shot, skip_bad_rows=cfg.skip_bad_rows)
    with _backend(backend) as b:
        context = Origin(data=str(Path(data).resolve()), dtype=b.model_info(cfg.model).dtype, **_where(b)).record()
        return tune(cfg, spec, split, b, out, ensemble=ensemble, context=context, progress=progress,
                    log=print if progress else (lambda *a: None))


def _where(backend: Backend) -> dict:
    """The server(s) a backend of bbt's asks, as config.json records them (nothing: in process), so
    that `resume` goes back there; through an evaluation cache."""
    from bbt.backends.http import HTTPBackend
    from bbt.backends.vllm import VLLMBackend
    from bbt.cache import CachedBackend

    while isinstance(backend, CachedBackend):
        backend = backend.backend
    if isinstance(backend, HTTPBackend):
        return {"endpoint": backend.endpoints}
    if isinstance(backend, VLLMBackend):
        return {"endpoint": [backend.engine.url], "model_files": backend.model_files}
    return {}


def _check_same_run(out: str | Path, cfg: TuneConfig, task: TaskSpec, ensemble: int | None, given) -> None:
    """Refuse `bbt.run(..., resume=True)` with a setting the run in `out` was not started with: a
    run continues with its own (what `resume` reads from its config.json)."""
    from bbt.rundir import saved_run

    saved = saved_run(out)
    differ = [f"{k}={getattr(saved.cfg, k)!r}" for k in given if getattr(cfg, k) != getattr(saved.cfg, k)]
    if task.name != saved.task.name:
        differ.append(f"task={saved.task.name!r}")
    if (ensemble or None) != saved.ensemble:
        differ.append(f"ensemble={saved.ensemble!r}")
    if differ:
        raise ConfigError(f"{out} was started with {', '.join(differ)}: give those, or continue it with its own "
                          f"settings with bbt.resume({str(out)!r})")


def resume(run: str | Path, *, backend: Backend | None = None, api_key: str | None = None, timeout: float = TIMEOUT,
           wait: float = WAIT, progress: bool = False, report_to: str = "none") -> dict:
    """Continue the run (or ensemble) in folder `run` where it stopped, as `bbt tune --resume RUN`
    does: with the settings, task, data, test sample and precision its config.json recorded, asking
    the server it was tuned through (`api_key`, `timeout`, `wait` for it), or the model in this
    process where it was tuned there. A finished run returns its metrics.json and pays nothing.
    `backend`: ask this one instead (the same model, in the run's precision)."""
    from bbt.data import limit_test, load_task_folder
    from bbt.rundir import saved_run

    saved = saved_run(run)
    cfg, origin = saved.cfg, saved.origin
    data = load_task_folder(origin.data, saved.task, seed=cfg.seed, k=cfg.k_shot, skip_bad_rows=cfg.skip_bad_rows)
    data = limit_test(data, origin.test_limit)
    owned = backend is None
    if owned:
        backend = _open_origin(origin, api_key=api_key, timeout=timeout, wait=wait)  # an ensemble's: its index's
    try:
        served_dtype(backend, cfg.model, origin.dtype, wanted_by=f"{run} was paid in")
        return tune(cfg, saved.task, data, backend, run, ensemble=saved.ensemble, resume=True,
                    context=origin.record(), progress=progress, report_to=report_to,
                    log=print if progress else (lambda *a: None))
    finally:
        if owned:
            backend.close()


def served_dtype(backend: Backend, model: str, dtype: str | None, *, wanted_by: str = "--dtype") -> str | None:
    """The precision `model` runs in behind `backend` (None: an upstream engine's own). A `dtype`
    asked for (by `wanted_by`; None and auto ask nothing) that it does not run in is refused,
    before anything is spent."""
    served = backend.model_info(model).dtype
    if dtype not in (None, "auto") and served != dtype:
        runs = served or "its engine's own precision"
        way = ", or leave --dtype out" if wanted_by == "--dtype" else " to continue it there"
        raise ConfigError(f"{wanted_by} {dtype}: the server runs {model} in {runs}; "
                          f"start it with bbt serve --dtype {dtype}{way}")
    return served


def _split_of(run: Path, task, split: str, data: str | Path | None):
    from bbt.data import load_task_folder
    from bbt.rundir import load_run_config

    saved = load_run_config(run)
    folder = data or saved.get("data")
    if not folder:
        raise DataError(f"{run} does not record its data folder: pass data=")
    cfg = saved.get("config", {})
    loaded = load_task_folder(folder, task, seed=cfg.get("seed", 42), k=cfg.get("k_shot", 16),
                              skip_bad_rows=cfg.get("skip_bad_rows", False))
    chosen = {"train": loaded.train, "dev": loaded.dev, "test": loaded.test}[split]
    return chosen, loaded.test_name if split == "test" else split


def evaluate(runs: str | Path | list, *, split: str = "test", data: str | Path | None = None, vote: str = "majority",
             backend: Backend | None = None, progress: bool = False) -> dict:
    """Scores on a split of a run's data: the tuned prompt beside its untuned start (z = 0) and the
    model without a prompt; several runs (or an ensemble folder): the ensemble, every member (one
    request per batch of inputs for all of them), their mean and the best; a gradient baseline:
    its adapter, in process. `progress`: a progress bar on stderr for each scoring pass. Without a
    `backend`, asked where the (first) run was tuned."""
    from bbt import ensemble as ens
    from bbt.rundir import is_gradient_run, load_artifact, member_runs
    from bbt.scoring import evaluate_split, scoring_bar

    if split not in ("train", "dev", "test"):
        raise ConfigError(f"split {split!r}: train, dev or test")
    members = member_runs(runs if isinstance(runs, list) else [runs])
    with _backend(backend, members[0]) as b:
        if len(members) == 1 and is_gradient_run(members[0]):
            return _evaluate_gradient(members[0], split, data, b, progress)
        artifacts = [load_artifact(r) for r in members]
        ens.check_compatible(artifacts)
        first = artifacts[0]
        chosen, name = _split_of(members[0], first.task, split, data)
        key = first.task.metric
        n = len(chosen)
        session = Session(b, first.model)  # scored, not booked: these queries belong to no run's budget
        with scoring_bar(f"scoring {name}: no prompt", n, progress) as tick:
            plain, _ = evaluate_split(session, first.plain_task or first.task, chosen, None, on_chunk=tick)
        if len(members) == 1:
            prompt = first.prompt()
            with scoring_bar(f"scoring {name}: tuned, z = 0", 2 * n, progress) as tick:
                tuned, _ = evaluate_split(session, first.task, chosen, prompt, on_chunk=tick)
                zero, _ = evaluate_split(session, first.task, chosen, prompt.untuned(), on_chunk=tick)
            result = {"split": name, "examples": len(chosen), "acc": tuned.accuracy, "loss": tuned.loss,
                      "zero_prompt_acc": zero.accuracy, "no_prompt_acc": plain.accuracy}
            if key == "f1":
                result.update(f1=tuned.metric, zero_prompt_f1=zero.metric, no_prompt_f1=plain.metric)
            if first.plain_task is not None:  # what the chosen words alone buy, as metrics.json reports it
                with scoring_bar(f"scoring {name}: no prompt, chosen words", n, progress) as tick:
                    words, _ = evaluate_split(session, first.task, chosen, None, on_chunk=tick)
                result["no_prompt_verbalizer_acc"] = words.accuracy
            return result
        from bbt.budget import Ledger

        ledger = Ledger(Budget())
        prompts = [a.prompt() for a in artifacts]
        with scoring_bar(f"scoring {name}: {len(prompts)} members", ens.passes(prompts) * n, progress) as tick:
            scores, _ = ens.evaluate(Session(b, first.model, ledger), first.task, chosen, prompts, vote, on_chunk=tick)
    result = {
        "split": name, "examples": len(chosen), "vote": vote, f"ensemble_{key}": scores.ensemble,
        "members": [{"run": str(r), key: m} for r, m in zip(members, scores.members)],
        f"mean_member_{key}": scores.mean_member, f"best_member_{key}": scores.best_member,
        f"no_prompt_{key}": plain.metric if key == "f1" else plain.accuracy,
        "requests": ledger.evaluation.requests, "queries": ledger.evaluation.queries,
    }
    if key == "f1":
        result["ensemble_acc"] = scores.ensemble_accuracy
    return result


def _evaluate_gradient(run: Path, split: str, data, backend: Backend, progress: bool = False) -> dict:
    from bbt.protocol import TaskSpec
    from bbt.rundir import load_run_config
    from bbt.runs import gradient_logits
    from bbt.scoring import evaluate_split, scoring_bar
    from bbt.tuner import Evaluation

    saved = load_run_config(run)
    task = TaskSpec.model_validate(saved["task"])
    chosen, name = _split_of(run, task, split, data)
    task, logits = gradient_logits(backend, run, chosen.examples)
    with scoring_bar(f"scoring {name}: no prompt", len(chosen), progress) as tick:
        plain, _ = evaluate_split(Session(backend, saved["config"]["model"]), task, chosen, None, on_chunk=tick)
    tuned = Evaluation.of(logits, chosen.labels, task.metric)
    result = {"split": name, "examples": len(chosen), "method": saved["config"]["method"],
              "acc": tuned.accuracy, "loss": tuned.loss, "no_prompt_acc": plain.accuracy}
    if task.metric == "f1":
        result.update(f1=tuned.metric, no_prompt_f1=plain.metric)
    return result


def predict(runs: str | Path | list, texts: list[str], *, pairs: list[str] | None = None, vote: str = "majority",
            backend: Backend | None = None) -> list[dict]:
    """{"text", "label", "probs"} for each text: one run, an ensemble (several runs or an ensemble
    folder; label by `vote`, probabilities the members' mean) or a gradient baseline. Without a
    `backend`, asked where the (first) run was tuned."""
    from bbt import ensemble as ens
    from bbt.protocol import Example, TaskSpec
    from bbt.rundir import is_gradient_run, load_artifact, load_run_config, member_runs
    from bbt.runs import gradient_logits
    from bbt.runs import predict as predict_prompts

    members = member_runs(runs if isinstance(runs, list) else [runs])
    with _backend(backend, members[0]) as b:
        if len(members) == 1 and is_gradient_run(members[0]):
            task = TaskSpec.model_validate(load_run_config(members[0])["task"])
            if task.pair and (pairs is None or len(pairs) != len(texts)):
                raise ConfigError(f"task {task.name!r} takes sentence pairs: give a text_pair for every text")
            examples = [Example(text=t, text_pair=pairs[i] if pairs else None) for i, t in enumerate(texts)]
            task, logits = gradient_logits(b, members[0], examples)
            probs = ens.probabilities(logits)
            labelled = [(task.labels[int(p.argmax())], [round(float(x), 4) for x in p]) for p in probs]
        else:
            artifacts = [load_artifact(r) for r in members]
            ens.check_compatible(artifacts)
            task = artifacts[0].task
            labelled = predict_prompts(b, artifacts, texts, pairs, vote=vote)
    return [{"text": t, "label": label, "probs": dict(zip(task.labels, probs))} for t, (label, probs) in zip(texts, labelled)]
