"""A run from start to finish: a search (`run_tune`), a gradient baseline (`run_gradient`) or an
ensemble (`run_ensemble`), each in a run folder (`bbt.rundir` names its files).

A run killed at any moment (kill -9 included) is continued with `run_tune(..., resume=True)`
(`bbt tune --resume RUN`): it reloads the last checkpoint, rewinds the ledger to it, and redoes
what came after, so it ends exactly as an uninterrupted run would. The requests redone are those
of one generation at most; with an evaluation cache (`bbt.cache`) they are answered from disk and
paid nothing, and the bundled server's idempotency keys keep a retried request from being billed
twice.
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from pathlib import Path

import numpy as np

from bbt import checkpoint, ensemble, export, jsonfile, metrics, rundir, scoring, verbalizers
from bbt.backends.base import Backend
from bbt.checkpoint import RunState
from bbt.budget import Budget, Ledger
from bbt.config import GRADIENT_METHODS, TuneConfig, check_mode, with_family_defaults
from bbt.data import Split, TaskData
from bbt.errors import ConfigError
from bbt.protocol import Example, TaskSpec
from bbt.rundir import PromptArtifact
from bbt.tasks import for_family
from bbt.session import Session
from bbt.tuner import Evaluation, TuneState, search
from bbt.version import __version__


def run_tune(cfg: TuneConfig, task: TaskSpec, data: TaskData, backend: Backend, out: str | Path, *,
             context: dict | None = None, progress: bool = True, log=print, resume: bool = False,
             replace: bool = False, report_to: str = "none") -> dict:
    """Tune, evaluate, and write the run folder; returns the metrics written to metrics.json.

    With `resume`, `out` is a run folder this function started before (with the same cfg, task and
    data): the run continues from its checkpoint, and a finished run just returns its metrics.
    Otherwise a folder that already holds a run is refused, unless `replace` (then its files go).
    `report_to="tensorboard"` also writes each generation as TensorBoard scalars to RUN/tensorboard.
    """
    wall_start = time.perf_counter()
    out = Path(out)
    saved = None
    info = backend.model_info(cfg.model)
    task = for_family(task, info.family)  # a built-in task's causal-LM template on a causal LM
    cfg = with_family_defaults(cfg, info.family, info.modes)  # e.g. a causal LM's prompt length, where cfg does not say
    check_mode(cfg, info)  # before anything is written or spent
    if resume:
        if not (out / rundir.CONFIG_FILE).exists():
            raise ConfigError(f"{out} is not a run folder (no config.json): nothing to resume")
        finished = rundir.read_metrics(out)
        if finished is not None:
            log(f"{out} is already finished; its metrics:")
            log(jsonfile.dumps(finished, indent=2))
            return finished
        saved = _load_state(out)
        run_id = rundir.load_run_config(out).get("run_id")  # None in folders from before run ids
        undo = contextlib.nullcontext()
    else:
        check_budget(cfg, info.family, log)
        if replace:
            for name in rundir.RUN_FILES:
                (out / name).unlink(missing_ok=True)
            checkpoint.remove(out / rundir.STATE_FILE)
        if (out / rundir.LEDGER_FILE).exists():
            raise ConfigError(f"{out} already holds a run: continue it with bbt tune --resume {out}, "
                              "or pick another --out")
        undo = _undone_unless_spent(out)
        run_id = uuid.uuid4().hex  # tags what this run pays for in a shared evaluation cache
    with undo, rundir.running(out):  # marked before config.json appears, so a watcher never sees it unowned
        if not resume:
            jsonfile.write(out / rundir.CONFIG_FILE, {
                "bbt_version": __version__, "run_id": run_id, "config": cfg.model_dump(), "task": task.model_dump(),
                "engine": info.engine, **(context or {})}, indent=2)
        ledger = Ledger(cfg.budget, out / rundir.LEDGER_FILE, run_id=run_id)
        try:  # the run's one session: every query it pays goes out through it
            return _run(cfg, task, data, Session(backend, cfg.model, ledger, info), out, saved, progress=progress,
                        log=log, wall_start=wall_start, report_to=report_to)
        finally:
            ledger.close()


def check_budget(cfg: TuneConfig, family: str, log=print) -> None:
    """Refuse, before anything is spent, a query budget that runs no generation: --verbalizer auto
    spends its queries (`bbt.verbalizers.queries`) before the search. One that runs less than a
    whole generation is said plainly: CMA-ES learns only from a whole one (a cut one is scored, not told)."""
    q = cfg.budget.queries
    if q is None or cfg.method in GRADIENT_METHODS:
        return
    before = len(verbalizers.queries(family, cfg.label_words)) if cfg.verbalizer == "auto" else 0
    whole = before + cfg.popsize
    if q <= before:
        raise ConfigError(
            f"--budget {q} runs no generation: --verbalizer auto spends {before} queries choosing the label words "
            f"first, so the smallest budget that runs one generation is {before + 1}, and a whole generation of "
            f"--popsize {cfg.popsize} (the first CMA-ES learns from) takes {whole}; or choose --verbalizer manual")
    if q < whole:
        log(f"note: --budget {q} leaves {q - before} queries for the search, less than one whole generation of "
            f"--popsize {cfg.popsize}: they are scored, but CMA-ES learns from none of them (--budget {whole} runs "
            "one whole generation)")


def _load_state(out: Path) -> RunState | None:
    """RUN/state.json, or None before the first checkpoint; a damaged one, or one of an earlier bbt,
    is refused with the way on."""
    path = out / rundir.STATE_FILE
    try:
        return checkpoint.load(path)
    except ConfigError as exc:
        files = [f for f in checkpoint.files(path) if f.exists()]
        raise ConfigError(
            f"{exc}\nto start this run's search over in the same folder, delete {' and '.join(map(str, files))}, "
            f"then run bbt tune --resume {out} again (what was paid stays in its ledger; an evaluation cache answers "
            "the repeated requests at no cost); or tune again with another --out") from None


def below_plain(m: dict) -> str | None:
    """The warning a run's metrics call for when the tuned prompt scores below the plain model (no
    soft prompt) on dev or test (`no_prompt_dev_acc`, `no_prompt_test_acc`; F1 too where the task is
    scored by it), or None. A split without a plain score (a gradient run's dev) is not compared."""
    test = m.get("test_split", "test")
    splits = [("test", test)] + ([("dev", "dev")] if test != "dev" else [])
    below = []
    for key, name in (("acc", "accuracy"), ("f1", "F1")):
        for split, shown in splits:
            tuned, plain = m.get(f"{split}_{key}"), m.get(f"no_prompt_{split}_{key}")
            if tuned is not None and plain is not None and tuned < plain:
                below.append(f"{shown} {name} {tuned:.4f}, plain model {plain:.4f}")
    if not below:
        return None
    return ("warning: the tuned prompt scores below the plain model (no soft prompt): " + "; ".join(below)
            + ". As it stands the plain model is the better choice for this task (a larger --budget, another --seed "
            "or another model may change that)")


@contextlib.contextmanager
def _undone_unless_spent(out: Path, files: tuple[str, ...] = rundir.RUN_FILES, spent=None):
    """Make `out` for a new run; if the run fails (Ctrl-C included) before it has spent anything,
    remove `files` from it, and the folder if this made it: there is nothing to resume, and the
    same --out can be used again. `spent()` says whether it has (default: its ledger holds an answer)."""
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if not (spent() if spent is not None else _ledger_written(out)):
            for name in files:
                (out / name).unlink(missing_ok=True)
            checkpoint.remove(out / rundir.STATE_FILE)
            if made:
                with contextlib.suppress(OSError):
                    out.rmdir()
        raise


def _ledger_written(out: Path) -> bool:
    """Whether RUN/ledger.jsonl holds a line: a request answered and booked."""
    ledger = out / rundir.LEDGER_FILE
    return ledger.exists() and ledger.stat().st_size > 0


def _run(cfg: TuneConfig, task: TaskSpec, data: TaskData, session: Session, out: Path, saved: RunState | None, *,
         progress: bool, log, wall_start: float, report_to: str = "none") -> dict:
    ledger, info = session.ledger, session.info
    for note in data.notes:
        log(f"note: {note}")
    if saved is None:
        ledger.rewind(0)  # killed before its first checkpoint: start over (what it paid stays in the ledger)
        with scoring.scoring_bar(f"scoring {data.test_name}: no prompt", len(data.test), progress) as tick:
            plain, _ = scoring.evaluate_split(session, task, data.test, None, on_chunk=tick)
        saved = RunState(plain=plain, ledger_step=ledger.step)
        checkpoint.save(out / rundir.STATE_FILE, saved)
    else:
        state = saved.tuning
        ledger.rewind(saved.ledger_step if state is None else state.ledger_step)
        log(f"resuming {out} after generation {0 if state is None else state.generation} "
            f"({ledger.tuning.queries} queries used, {ledger.paid.queries} paid so far)")
    plain = saved.plain
    log(f"no-prompt {data.test_name} accuracy: {plain.accuracy:.4f}")
    family = info.family
    if cfg.verbalizer == "auto" and saved.choice is None and saved.tuning is None:
        saved.choice = verbalizers.choose(session, task, data.train, data.dev, cfg.label_words)
        if saved.choice.task != task:
            with scoring.scoring_bar(f"scoring {data.test_name}: no prompt, chosen words", len(data.test), progress) as tick:
                saved.chosen_plain, _ = scoring.evaluate_split(session, saved.choice.task, data.test, None,
                                                               on_chunk=tick)
        saved.ledger_step = ledger.step
        checkpoint.save(out / rundir.STATE_FILE, saved)
    own_words = task
    if saved.choice is not None:
        task = saved.choice.task
        c = saved.choice
        log(f"verbalizer: {c.label_words} word(s) per class ({c.queries} queries; held-out accuracy by words: "
            + ", ".join(f"{k}: {v:.3f}" + (f" (z {c.beats_own[k]:+.2f})" if k in c.beats_own else "")
                        for k, v in c.held_out.items()) + f"; more words need z > {metrics.CHANCE_MARGIN})"
            + (f"; no-prompt {data.test_name} accuracy with them: {saved.chosen_plain.accuracy:.4f}"
               if saved.chosen_plain else ""))

    bar = _progress_bar(cfg.budget.queries, progress)
    if bar is not None:
        bar.update(ledger.tuning.queries)
    history = [] if saved.tuning is None else saved.tuning.history
    log_file = (out / rundir.LOG_FILE).open("w")  # rewritten up to the checkpoint: generations after it are redone
    log_file.writelines(jsonfile.dumps(record) + "\n" for record in history)

    board = _tensorboard(out) if report_to == "tensorboard" else None

    def on_generation(record: dict) -> None:
        log_file.write(jsonfile.dumps(record) + "\n")
        log_file.flush()
        if board is not None:
            step = record["queries_used"]  # x axis: queries paid for, as every bbt curve
            for key in ("loss_min", "loss_mean", "train_acc", "best_train_loss", "best_dev_metric", "dev_loss"):
                if record.get(key) is not None:
                    board.add_scalar(f"tuning/{key}", record[key], step)
            board.flush()
        if bar is not None:
            bar.update(record["queries_used"] - bar.n)
            dev = record["best_dev_metric"]
            bar.set_postfix(loss=f"{record['best_train_loss']:.4f}", train_acc=f"{record['best_train_acc']:.3f}",
                            dev=f"{dev:.3f}" if dev is not None else "-", refresh=False)

    def on_state(state: TuneState) -> None:
        saved.tuning = state
        checkpoint.save(out / rundir.STATE_FILE, saved)

    try:
        result = search(session, cfg, task, data.train, data.dev, on_generation, state=saved.tuning, on_state=on_state)
    finally:
        log_file.close()
        if bar is not None:
            bar.close()
        if board is not None:
            board.close()
    if result.generations == 0:
        log("warning: the budget ran out before the search began, so no generation ran: the prompt is its untuned "
            "start (z = 0); give a larger budget")
    prompt = result.prompt
    artifact = PromptArtifact(method=cfg.method, model=cfg.model, task=task, prompt_length=cfg.prompt_length,
                              z=prompt.z.tolist(), projections=prompt.projections, init_seed=prompt.init_seed,
                              init_text=prompt.init_text,
                              prompt_placement=info.prompt_placement, prompt_position=info.prompt_position,
                              plain_task=own_words if own_words != task else None)
    (out / rundir.ARTIFACT_FILE).write_text(artifact.model_dump_json(indent=1))
    jsonfile.write(out / rundir.PATH_FILE, {"version": 1, "points": [{"queries": q, "z": z.tolist()} for q, z in result.path]})
    # the plain model on dev too, so that a prompt below it there is said (a folder without a test set: the same split)
    plain_dev = plain if data.test is data.dev else scoring.evaluate_split(session, own_words, data.dev, None)[0]
    with scoring.scoring_bar(f"scoring {data.test_name}: z = 0, tuned", 2 * len(data.test), progress) as tick:
        zero, _ = scoring.evaluate_split(session, task, data.test, prompt.untuned(), on_chunk=tick)
        tuned, _, received = scoring.evaluate_materialized(session, task, data.test, prompt, on_chunk=tick)
    export.save_prompts(out / rundir.PROMPTS_FILE, received, method=cfg.method, model=cfg.model,
                        prompt_placement=info.prompt_placement, prompt_position=info.prompt_position)
    dev = result.dev
    search_queries = ledger.tuning.queries - (saved.choice.queries if saved.choice is not None else 0)
    out_metrics = {
        "train_acc": result.train.accuracy if result.generations else None,  # nothing was scored on train
        "dev_acc": dev.accuracy if dev else None,
        "test_acc": tuned.accuracy,
        "zero_prompt_test_acc": zero.accuracy,  # the untuned prompt, z = 0: where the search started
        "no_prompt_test_acc": plain.accuracy,  # the model without a soft prompt, the task's own words
        "no_prompt_dev_acc": plain_dev.accuracy,
        "test_split": data.test_name,
        "dtype": info.dtype,  # the precision the model ran in (None: an upstream engine's own)
        "train_loss": result.train.loss,
        "dev_loss": dev.loss if dev else None,
        "test_loss": tuned.loss,
        "queries_used": ledger.tuning.queries,
        "queries_paid": ledger.paid.queries,  # billed by the server, evaluation included; cache hits are free
        "generations": result.generations,
        "stop_reason": result.stop_reason,  # "budget", "rounds" or "patience"
        **({} if result.fold is None else {"fold": result.fold}),  # two folds: 1 if the prompt was fitted to dev
        "tuning_seconds": round(result.seconds, 3),
        # the search's own queries over its own time (the verbalizer's are spent before it); none without a generation
        "queries_per_second": (round(search_queries / result.seconds, 3) if result.generations and result.seconds > 0
                               else None),
        "spending": ledger.summary(),
    }
    if result.above_chance is not None:
        checked = "train" if result.fold == 1 else "dev"
        t = result.above_chance
        out_metrics["held_out_check"] = {"split": checked, "above_chance": round(t, 3) if math.isfinite(t) else None,
                                         "threshold": metrics.CHANCE_MARGIN,
                                         "passed": bool(t >= metrics.CHANCE_MARGIN)}
    if task.metric == "f1":
        out_metrics.update(train_f1=result.train.metric, dev_f1=dev.metric if dev else None,
                           test_f1=tuned.metric, zero_prompt_test_f1=zero.metric, no_prompt_test_f1=plain.metric,
                           no_prompt_dev_f1=plain_dev.metric)
    if saved.choice is not None:
        c = saved.choice
        out_metrics["verbalizer"] = {
            "label_words": c.label_words, "held_out_by_label_words": {str(k): v for k, v in c.held_out.items()},
            # each K > 1's sign test against the own words on the same inputs (eligible above CHANCE_MARGIN)
            "sign_test_z_by_label_words": {str(k): round(z, 3) for k, z in c.beats_own.items()},
            "queries": c.queries, "entries": task.label_texts if family == "encoder" else task.verbalizer,
        }
        # what the chosen words alone buy, before any soft prompt
        out_metrics["no_prompt_verbalizer_test_acc"] = (saved.chosen_plain or plain).accuracy
    out_metrics["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
    out_metrics = rundir.write_metrics(out, **out_metrics)
    if saved.tuning is not None:  # the search has ended: its checkpoint keeps no CMA-ES (BBTv2: 120 MB fewer)
        checkpoint.save(out / rundir.STATE_FILE, saved)
    log(f"tuned {data.test_name} accuracy: {tuned.accuracy:.4f} (zero prompt z = 0: {zero.accuracy:.4f}, "
        f"no prompt: {plain.accuracy:.4f})"
        + (f", F1 {tuned.metric:.4f} (zero prompt {zero.metric:.4f}, no prompt {plain.metric:.4f})" if task.metric == "f1" else ""))
    check = out_metrics.get("held_out_check")
    if check is not None and not check["passed"]:
        t = result.above_chance
        log(f"warning: on {check['split']} the tuned prompt shows no sign of reading the task better than a guess "
            f"that ignores the input (its cross-entropy is {abs(t):.2f} standard errors {'below' if t >= 0 else 'above'} "
            f"that guess's, ln {len(task.labels)} on balanced classes; {metrics.CHANCE_MARGIN} below are needed): its "
            "gain over the plain model is not to be trusted, and the plain model (no soft prompt) may be the safer "
            "choice for this task")
    below = below_plain(out_metrics)
    if below is not None:
        log(below)
    log(ledger.describe())
    if ledger.mismatches:
        log(f"note: the server's usage differed from the client's count {len(ledger.mismatches)} times; the ledger books "
            "the server's (metrics.json: usage_mismatches). An engine that reads a request in two passes bills both: "
            "vLLM does for --verbalizer auto's likeliest words")
    log(f"run folder: {out}")
    return out_metrics


def local_service(backend: Backend):
    """The in-process model side behind a backend (through caches), or None for a remote one."""
    while not hasattr(backend, "service"):
        inner = getattr(backend, "backend", None)
        if inner is None:
            return None
        backend = inner
    return backend.service


def run_gradient(cfg: TuneConfig, task: TaskSpec, data: TaskData, backend: Backend, out: str | Path, *,
                 context: dict | None = None, log=print) -> dict:
    """Train a gradient baseline (cfg.method: prompt-tuning, p-tuning, prefix-tuning, p-tuning-v2)
    through PEFT on the in-process model, and write a run folder like `run_tune`'s: config.json,
    log.jsonl (one line per epoch), metrics.json (the same scores, plus passes and examples seen)
    and adapter/ (the PEFT adapter, best on dev). Needs the weights: a remote backend is refused."""
    service = local_service(backend)
    if service is None:
        raise ConfigError(f"--method {cfg.method} trains with the model's gradients, so it needs the weights: run it "
                          "in process (without --endpoint); against an API, use bbt or bbtv2")
    from servers import gradient  # the model side: torch, PEFT

    wall_start = time.perf_counter()
    out = Path(out)
    family = backend.model_info(cfg.model).family
    task, cfg = for_family(task, family), with_family_defaults(cfg, family)
    if cfg.verbalizer != "manual":
        raise ConfigError(f"--verbalizer {cfg.verbalizer} is for bbt and bbtv2; the gradient methods read the task's "
                          "own words (give a task file with the words you want)")
    pm = service.get(cfg.model)
    gradient.check(pm, cfg.method, cfg.prompt_length)
    if (out / rundir.CONFIG_FILE).exists():
        raise ConfigError(f"{out} already holds a run: pick another --out (nothing was overwritten)")
    recipe = gradient.Recipe.of(cfg)
    # one block, as run_tune's: running.json goes when the run ends or fails, and before the folder
    # is removed by a failure before anything was spent (once the plain model is scored, the ledger
    # holds its requests, and a later failure leaves the folder as it is)
    with _undone_unless_spent(out), rundir.running(out):
        jsonfile.write(out / rundir.CONFIG_FILE, {"bbt_version": __version__, "config": cfg.model_dump(),
                                             "task": task.model_dump(), **(context or {})}, indent=2)
        ledger = Ledger(cfg.budget, out / rundir.LEDGER_FILE)  # the no-prompt baseline is scored like any run's
        try:
            plain, _ = scoring.evaluate_split(Session(backend, cfg.model, ledger), task, data.test, None)
        finally:
            ledger.close()
        log(f"no-prompt {data.test_name} accuracy: {plain.accuracy:.4f}")
        log(f"{cfg.method}: {recipe.optimizer}, learning rate {recipe.learning_rate} ({recipe.lr_source}), up to "
            f"{cfg.epochs} epochs of batches of {cfg.batch_size}")
        with (out / rundir.LOG_FILE).open("w") as log_file:
            def on_epoch(record: dict) -> None:
                log_file.write(jsonfile.dumps(record) + "\n")
                log_file.flush()

            result = gradient.train(pm, task, data.train, data.dev, recipe, on_epoch=on_epoch)
        result.peft_model.save_pretrained(str(out / rundir.ADAPTER_DIR))
        test_logits = gradient.predict_logits(pm, result.peft_model, task, data.test.examples, cfg.method)
        test = Evaluation.of(test_logits, data.test.labels, task.metric)
        out_metrics = {
            "method": cfg.method,
            "train_acc": result.train.accuracy, "dev_acc": result.dev.accuracy, "test_acc": test.accuracy,
            "zero_prompt_test_acc": None,  # no z = 0: a gradient method starts from PEFT's initialisation
            "no_prompt_test_acc": plain.accuracy, "test_split": data.test_name,
            "train_loss": result.train.loss, "dev_loss": result.dev.loss, "test_loss": test.loss,
            "queries_used": 0,  # no black-box queries: it reads gradients
            "epochs": result.epochs, "best_epoch": result.best_epoch, "stop_reason": result.stop_reason,
            "forward_passes": result.forward_passes + math.ceil(len(data.test) / 32),
            "backward_passes": result.backward_passes, "examples_seen": result.examples_seen,
            "trainable_parameters": result.trainable_parameters, "learning_rate": recipe.learning_rate,
            "optimizer": recipe.optimizer,
            "tuning_seconds": round(result.seconds, 3),
        }
        if task.metric == "f1":
            out_metrics.update(train_f1=result.train.metric, dev_f1=result.dev.metric, test_f1=test.metric,
                               no_prompt_test_f1=plain.metric)
        out_metrics["wall_seconds"] = round(time.perf_counter() - wall_start, 3)
        out_metrics = rundir.write_metrics(out, **out_metrics)
        log(f"{cfg.method} {data.test_name} accuracy: {test.accuracy:.4f} (no prompt: {plain.accuracy:.4f}); "
            f"{result.epochs} epochs, best {result.best_epoch}, {result.backward_passes} backward passes, "
            f"{result.trainable_parameters} trainable parameters")
        below = below_plain(out_metrics)
        if below is not None:
            log(below)
    log(f"run folder: {out}")
    return out_metrics


def gradient_logits(backend: Backend, run: str | Path, examples: list[Example]) -> tuple[TaskSpec, np.ndarray]:
    """The task and class scores [N, C] of a gradient baseline's run folder (its PEFT adapter), in process."""
    saved = rundir.load_run_config(run)
    cfg, task = TuneConfig.model_validate(saved["config"]), TaskSpec.model_validate(saved["task"])
    service = local_service(backend)
    if service is None:
        raise ConfigError(f"{run} is a {cfg.method} run: scoring its PEFT adapter needs the weights, so it runs in "
                          "process (without --endpoint)")
    from servers import gradient

    pm = service.get(cfg.model)
    model = gradient.load(pm, str(Path(run) / rundir.ADAPTER_DIR), cfg.method)
    with pm.lock:
        return task, gradient.predict_logits(pm, model, task, examples, cfg.method)


def share_budget(budget: Budget, n: int) -> Budget:
    """What each of n members may spend of one budget (every limit divided, rounded down)."""
    if n < 1:
        raise ConfigError(f"an ensemble needs at least 1 member, not {n}")
    update = {}
    for unit in ("queries", "requests", "examples", "tokens"):
        v = getattr(budget, unit)
        if v is not None:
            if v // n < 1:
                raise ConfigError(f"a budget of {v} {unit} cannot be shared by {n} members")
            update[unit] = v // n
    if budget.cost is not None:
        update["cost"] = budget.cost / n
    return budget.model_copy(update=update)


def run_ensemble(cfg: TuneConfig, n: int, task: TaskSpec, data: TaskData, backend: Backend, out: str | Path, *,
                 context: dict | None = None, progress: bool = True, log=print, resume: bool = False) -> dict:
    """Tune n prompts on one split with search seeds s, s+1, ... (s: cfg.search) in turn, then score
    them together; returns (and writes to OUT/metrics.json) the ensemble's and the members' metrics.

    The budget is the whole ensemble's: each member gets 1/n of it. Each member is an ordinary run
    folder OUT/member-i (resumable on its own); OUT/ensemble.json lists them. With `resume`,
    finished members are kept and a member cut short continues from its checkpoint.
    """
    out = Path(out)
    info = backend.model_info(cfg.model)
    cfg = with_family_defaults(cfg, info.family, info.modes)
    check_mode(cfg, info)
    if not resume and (out / rundir.INDEX_FILE).exists():
        raise ConfigError(f"{out} already holds an ensemble: continue it with bbt tune --resume {out}, or pick another --out")
    names = [f"member-{i + 1}" for i in range(n)]
    member_cfg = cfg.model_copy(update={"budget": share_budget(cfg.budget, n)})
    if not resume:
        check_budget(member_cfg, info.family, log=lambda *a: None)  # each member says what a small budget runs
    undo = contextlib.nullcontext() if resume else _undone_unless_spent(
        out, files=(rundir.INDEX_FILE,), spent=lambda: any((out / name / rundir.CONFIG_FILE).exists() for name in names))
    results = []
    with undo:
        out.mkdir(parents=True, exist_ok=True)
        rundir.write_index(out, names, config=cfg.model_dump(), task=task.model_dump(), **(context or {}))
        for i, name in enumerate(names):
            log(f"member {i + 1} of {n} (search seed {cfg.search + i})")
            mc = member_cfg.model_copy(update={"search_seed": cfg.search + i})
            started = (out / name / rundir.CONFIG_FILE).exists()
            results.append(run_tune(mc, task, data, backend, out / name, context=context, progress=progress, log=log,
                                    resume=started))
    artifacts = [rundir.load_artifact(out / name) for name in names]
    # the members read the task through the words they chose (--verbalizer auto): the same split
    # and model choose the same words, whatever the search seed
    task = artifacts[0].task
    if any(a.task != task for a in artifacts[1:]):
        raise ConfigError(f"the members of {out} read the task through different words; tune the ensemble again "
                          "with --verbalizer manual, or with --label-words K")
    prompts = [a.prompt() for a in artifacts]
    ledger = Ledger(Budget(), out / rundir.LEDGER_FILE)  # what scoring the ensemble spends (evaluation: no limit)
    try:
        session = Session(backend, cfg.model, ledger)
        dev, _ = ensemble.evaluate(session, task, data.dev, prompts, "majority")
        test_logits = ensemble.score_prompts(session, task, data.test, prompts)
    finally:
        ledger.close()
    labels = np.asarray(data.test.labels)
    votes = {vote: Evaluation.of(ensemble.combine(test_logits, vote), labels, task.metric) for vote in ("majority", "mean")}
    members = [float(x) for x in metrics.score(task.metric, test_logits, labels)]
    best = int(np.argmax(dev.members))  # the best single member, chosen on dev
    out_metrics = {
        "members": n,
        **{f"test_{'acc' if task.metric == 'acc' else 'f1'}_{vote}_vote": ev.metric for vote, ev in votes.items()},
        "member_test": members,
        "mean_member_test": float(np.mean(members)),
        "best_dev_member": best + 1,
        "best_dev_member_test": members[best],
        "no_prompt_test_acc": results[0]["no_prompt_test_acc"],
        **({"no_prompt_verbalizer_test_acc": results[0]["no_prompt_verbalizer_test_acc"]}
           if "no_prompt_verbalizer_test_acc" in results[0] else {}),
        "test_split": data.test_name,
        "metric": task.metric,
        "queries_used": sum(r["queries_used"] for r in results),
        "tuning_seconds": round(sum(r["tuning_seconds"] for r in results), 3),
    }
    out_metrics["test_acc"] = votes["majority"].accuracy
    out_metrics = rundir.write_metrics(out, **out_metrics)
    key = "acc" if task.metric == "acc" else "f1"
    log(f"ensemble of {n}, {data.test_name} {key}: majority {out_metrics[f'test_{key}_majority_vote']:.4f}, "
        f"mean vote {out_metrics[f'test_{key}_mean_vote']:.4f}; members {', '.join(f'{m:.4f}' for m in members)} "
        f"(mean {out_metrics['mean_member_test']:.4f}, best on dev {members[best]:.4f}); "
        f"no prompt {out_metrics['no_prompt_test_acc']:.4f}")
    return out_metrics


def _tensorboard(out: Path):
    try:
        from tensorboardX import SummaryWriter
    except ImportError:
        raise ConfigError("--report-to tensorboard needs tensorboardX (no torch): pip install tensorboardX") from None
    return SummaryWriter(str(out / "tensorboard"))


def predict(backend: Backend, artifact: PromptArtifact | list[PromptArtifact], texts: list[str],
            pairs: list[str] | None = None, model: str | None = None, vote: str = "majority") -> list[tuple[str, list[float]]]:
    """Label and class probabilities for each text with a tuned prompt, or with an ensemble (a list
    of artifacts, scored in one request: the label by `vote`, the probabilities the members' mean)."""
    artifacts = artifact if isinstance(artifact, list) else [artifact]
    first = artifacts[0]
    if first.task.pair and (pairs is None or len(pairs) != len(texts)):
        raise ConfigError(f"task {first.task.name!r} takes sentence pairs: give a text_pair for every text")
    examples = [Example(text=t, text_pair=pairs[i] if pairs else None) for i, t in enumerate(texts)]
    split = Split(examples, [0] * len(examples))
    prompts = [a.prompt() for a in artifacts]
    logits = ensemble.score_prompts(Session(backend, model or first.model), first.task, split, prompts)
    labels = ensemble.combine(logits, vote).argmax(axis=1)
    probs = ensemble.probabilities(logits).mean(axis=0)
    return [(first.task.labels[int(y)], [round(float(x), 4) for x in p]) for y, p in zip(labels, probs)]


def _progress_bar(total: int | None, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="query", desc="tuning", dynamic_ncols=True)
