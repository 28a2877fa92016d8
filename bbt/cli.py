"""The `bbt` command: tune | evaluate | predict | serve | demo."""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import typing
from pathlib import Path

from pydantic import ValidationError

from bbt.version import __version__
from bbt.backends.http import TIMEOUT, WAIT
from bbt.budget import Budget
from bbt.config import DEFAULT_MODEL, FAMILY_DEFAULTS, GRADIENT_METHODS, IMPLIES, MODEL_CHOICE, TuneConfig
from bbt.errors import BackendError, BBTError, ConfigError

EXAMPLES = """examples:
  bbt tune --task sst2 --data ../shared/data/sst2 --seed 42 --budget 2000 --out runs/sst2-42
  bbt tune --task sst2 --data ../shared/data/sst2 --endpoint http://127.0.0.1:8000 --budget 400 --out runs/http
  bbt tune --resume runs/http          (a run that was killed or failed: continue where it stopped)
  bbt evaluate --run runs/sst2-42 --split test
  bbt predict --run runs/sst2-42 "a gripping, well acted film" "a dull mess"
  bbt predict runs/sst2-42 - < reviews.txt          (one text a line)
  bbt serve --model smollm2 --port 8000
  bbt demo
"""



class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Adds "(default: X)" to an option's help only where the help does not already say its
    default, and never for None or an on/off flag (an absent option)."""

    def _get_help_string(self, action) -> str:
        text = action.help or ""
        if "default" in text.lower() or action.default is None or isinstance(action.default, bool):
            return text
        return super()._get_help_string(action)


def _query_limit(value: str) -> int | None:
    """--budget: a number of queries, or 'none' (another limit must then be given)."""
    if value.strip().lower() == "none":
        return None
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of queries or 'none', got {value!r}") from None


# `bbt tune`'s options for TuneConfig's fields are generated from them (`_add_setting`): the field's
# description is the help, its default is printed once. What the CLI adds is layout: the group,
# a short metavar, and --budget/--max-* for the budget's fields.
_DATA_FIELDS = ("seed", "search_seed", "k_shot", "skip_bad_rows")
_METAVARS = {"seed": "S", "search_seed": "S", "popsize": "N", "sigma": "S", "k_shot": "K", "epochs": "N",
             "batch_size": "N", "prompt_length": "L", "intrinsic_dim": "D", "init_text": "TEXT", "label_words": "K",
             "local_share": "F", "local_dim": "K", "bound": "B", "rounds": "R", "patience": "G", "queries": "QUERIES",
             "requests": "N", "examples": "N", "tokens": "N", "cost": "X", "price_per_1k_tokens": "X"}
_BUDGET_FLAGS = {"queries": "--budget", "requests": "--max-requests", "examples": "--max-examples",
                 "tokens": "--max-tokens", "cost": "--max-cost", "price_per_1k_tokens": "--price-per-1k-tokens"}
# settings parsed as None unless given, so that the model family's default, or a setting that implies
# them (config.IMPLIES), decides (TuneConfig.model_fields_set)
_LEFT_OPEN = {*FAMILY_DEFAULTS["causal"], *IMPLIES, *(implied for implied, _ in IMPLIES.values())}


def _flag(name: str) -> str:
    return _BUDGET_FLAGS.get(name) or "--" + name.replace("_", "-")


def _dest(name: str) -> str:
    return _flag(name)[2:].replace("-", "_")


def _setting_help(description: str) -> str:
    """A field's description as an option's help: the settings it names in backquotes as options."""
    def option(match: re.Match) -> str:
        name = match.group(1)
        known = name in TuneConfig.model_fields or name in Budget.model_fields
        return _flag(name) if known else name

    return re.sub(r"`([a-z0-9_]+)`", option, description)


def _option_type(annotation) -> tuple[type, list | None]:
    """The type and choices of a field's annotation: a Literal's values are the choices, `X | None` is X."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is typing.Literal:
        return type(args[0]), list(args)
    return _option_type(args[0]) if args else (annotation, None)


def _add_setting(group, name: str, field) -> None:
    """One option for a TuneConfig (or Budget) field: its description as help, its default said once."""
    text = _setting_help(field.description)
    kind, choices = _option_type(field.annotation)
    if kind is bool:
        group.add_argument(_flag(name), action="store_true", help=text)
        return
    default = field.default
    if name in _LEFT_OPEN:
        family = FAMILY_DEFAULTS["causal"].get(name)
        if default is not None:
            text += f" (default: {default}" + (f"; causal LMs: {family})" if family is not None else ")")
        default = None
    if name == "queries":
        kind, text = _query_limit, text + "; none: no query limit, with one of the limits below"
    group.add_argument(_flag(name), type=kind, choices=choices, default=default, metavar=_METAVARS.get(name),
                       help=text)


def _add_backend_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where the model runs")
    g.add_argument("--endpoint", action="append", metavar="URL",
                   help="a bbt server (repeat to split each population across several) or a vLLM server; default: in "
                   "this process")
    g.add_argument("--api-key", metavar="KEY", help="API key for the endpoint (or set BBT_API_KEY)")
    g.add_argument("--engine", choices=["auto", "bbt", "vllm"], default="auto",
                   help="what serves --endpoint: a bbt server, or vLLM (started with --enable-prompt-embeds); auto: "
                   "recognised from its answers")
    g.add_argument("--model-files", metavar="DIR",
                   help="vLLM: where the served model's tokenizer and input embeddings are (a folder or .gguf file); "
                   "default: --model itself (a folder, or a name bbt knows: smollm2)")
    g.add_argument("--timeout", type=float, default=TIMEOUT, metavar="S", help="seconds to wait for one answer")
    g.add_argument("--wait", type=float, default=WAIT, metavar="S",
                   help="seconds to keep retrying a server that has answered and is now down or failing, e.g. while it "
                   "restarts; an address where no bbt server has answered yet gets at most 10 s, so a "
                   "wrong --endpoint fails fast")
    g.add_argument("--retries", type=int, default=None, metavar="N", help="also give up after N retries of one request")
    g.add_argument("--device", metavar="DEV", help="where a model run in this process runs: auto (a GPU if torch sees "
                   "one, else the CPU), cpu, cuda, cuda:N or mps (default: auto); a server's is set by bbt serve --device")
    g.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default=None,
                   help="precision of a model run in this process: float32 (default), bfloat16 (twice the queries/s of "
                   "SmolLM2 on a CPU with AVX-512 BF16; norms, softmax and read-out stay float32; answers move a little) "
                   "or auto (bfloat16 for causal LMs where the hardware pays, measured to keep SmolLM2's accuracy within 1 "
                   "point; float32 for the rest); a server's is "
                   "set by bbt serve --dtype, and with --endpoint a --dtype given must be the server's")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="bbt",
        description="Black-box tuning of language models served as an API: CMA-ES searches a small vector z, "
        "a fixed random matrix maps it to a soft prompt, every candidate costs one query.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"bbt {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    t = sub.add_parser("tune", help="tune a soft prompt for a few-shot task", description=(
        "Tune a soft prompt with CMA-ES within a query budget, then score it on the test split. "
        "Writes config.json, log.jsonl, prompt.json and metrics.json to --out. The method and budget options are "
        "TuneConfig's fields (bbt.config), each described once there."),
        formatter_class=_Help)
    g = t.add_argument_group("task and data")
    g.add_argument("--task", help="built-in task (sst2 yelpp agnews dbpedia mrpc rte snli) or a .json/.yaml task file; "
                   "default: DATA/task.json")
    g.add_argument("--data", metavar="DIR",
                   help="(required) task folder: task.json, 16shot/seedS/{train,dev}.jsonl, test.jsonl; or your own "
                   "train.jsonl and dev.jsonl (used as given); or a pool.jsonl to sample from")
    m = t.add_argument_group("method")
    for name, field in TuneConfig.model_fields.items():
        if name != "budget":
            _add_setting(g if name in _DATA_FIELDS else m, name, field)
    g.add_argument("--ensemble", type=int, default=None, metavar="N",
                   help="tune N prompts on the split with search seeds S, S+1, ... in turn and score them together "
                   "(OUT/member-i, OUT/ensemble.json); the budget is the whole ensemble's, 1/N per member")
    g.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="score at most N test examples, a seeded sample (the same for every run; as bbt sweep's "
                   "--test-limit); default, or 0: all")
    g.add_argument("--out", metavar="DIR", help="(required) run folder to write")
    g.add_argument("--resume", metavar="RUN", help="continue the run in folder RUN where it stopped (killed, failed or "
                   "out of quota), with the settings in RUN/config.json; only the options of the model's location, "
                   "the cache and --quiet may be given with it")
    m.add_argument("--report-to", choices=["none", "tensorboard"], default="none",
                   help="also log each generation as TensorBoard scalars in RUN/tensorboard (pip install tensorboardX)")
    b = t.add_argument_group("budget (tuning: train and dev queries; never exceeded)")
    for name in _BUDGET_FLAGS:
        _add_setting(b, name, Budget.model_fields[name])
    t.add_argument("--dry-run", action="store_true", help="print what the run would spend and about how long it "
                   "takes (a model in this process is timed on three unbilled requests on train), then exit")
    t.add_argument("--quiet", action="store_true", help="no progress bars (the model's loading bar included)")
    c = t.add_argument_group("evaluation cache (an answer already paid for is not paid again)")
    c.add_argument("--cache", metavar="FILE", help="SQLite file to keep answers in, shared by runs "
                   "(default: $BBT_CACHE, else ~/.cache/bbt/evaluations.sqlite)")
    c.add_argument("--no-cache", action="store_true", help="ask the model every time")
    _add_backend_args(t)

    e = sub.add_parser("evaluate", help="score a tuned prompt on a split", description=(
        "Score a run's prompt, its untuned start (z = 0) and the model without a prompt on a split of its data folder."),
        formatter_class=_Help)
    e.add_argument("--run", required=True, action="append", metavar="DIR",
                   help="run folder written by bbt tune; give it several times (or an --ensemble folder) to score "
                   "an ensemble, every member in the same request")
    e.add_argument("--vote", choices=["majority", "mean"], default="majority",
                   help="how an ensemble combines its members: majority vote (ties: the higher mean probability) or "
                   "mean of class probabilities")
    e.add_argument("--split", choices=["train", "dev", "test"], default="test", help="which split")
    e.add_argument("--data", metavar="DIR", help="data folder (default: the one the run used)")
    e.add_argument("--in-process", action="store_true",
                   help="run the model in this process even when the run was tuned through a server (without "
                   "--endpoint, such a run is scored by the server it names)")
    e.add_argument("--quiet", action="store_true", help="no progress bars (the model's loading bar included)")
    _add_backend_args(e)

    p = sub.add_parser("predict", help="label texts with a tuned prompt",
                       description="Print the predicted label and class probabilities of each text as JSON lines.")
    p.add_argument("--run", action="append", metavar="DIR",
                   help="run folder written by bbt tune; several (or an --ensemble folder): an ensemble. Without "
                   "--run, the first argument is the run folder: bbt predict RUN TEXT ...")
    p.add_argument("--vote", choices=["majority", "mean"], default="majority", help="how an ensemble combines its members")
    p.add_argument("texts", nargs="+", metavar="TEXT", help="texts to label (pair tasks: TEXT and PAIR joined by ' ||| '); "
                   "- reads them from standard input, one per line")
    p.add_argument("--in-process", action="store_true",
                   help="run the model in this process even when the run was tuned through a server (without "
                   "--endpoint, such a run is scored by the server it names)")
    _add_backend_args(p)

    x = sub.add_parser("export", help="write a tuned prompt for other tools (a PEFT adapter, bbt's deep-prompt file)",
                       description="Write a run's prompt as a PEFT PROMPT_TUNING adapter (--format peft; BBT runs on "
                       "models without leading special tokens) or as bbt's own per-layer prompt file (--format bbt; "
                       "BBT and BBTv2). An ensemble folder exports each member to OUT/member-i.",
                       formatter_class=_Help)
    x.add_argument("--run", required=True, metavar="DIR", help="run (or ensemble) folder written by bbt tune")
    x.add_argument("--format", choices=["peft", "bbt"], default="peft", help="what to write")
    x.add_argument("--out", required=True, metavar="DIR", help="folder to write (existing files are never overwritten)")
    x.add_argument("--base-model", metavar="NAME", help="base_model_name_or_path in the adapter (default: the run's model)")

    w = sub.add_parser("sweep", help="a grid of runs (tasks x seeds x methods x settings) scored at several budgets",
                       description="Run every cell of a grid into OUT/cells/NAME (run folders, as bbt tune writes), "
                       "each once to the largest budget and scored at every --budgets value from the prompt it had "
                       "then. Rerun the same command to finish a sweep: done cells are skipped, a cut cell resumes. "
                       "`bbt sweep report OUT` prints the table.", formatter_class=_Help)
    w.add_argument("--tasks", nargs="+", metavar="TASK", help="task folders under --data-root (built-in names or not)")
    w.add_argument("--data-root", metavar="DIR", help="folder holding one folder per task")
    w.add_argument("--seeds", nargs="+", type=int, default=[13, 42, 87], help="split seeds")
    w.add_argument("--methods", nargs="+", default=["bbt"], choices=["bbt", "bbtv2", *GRADIENT_METHODS],
                   help="each cell names its method, so a sweep does not take a model family's default (default: bbt)")
    w.add_argument("--budgets", nargs="+", type=int, default=[500], metavar="Q", help="queries at which to score")
    for name in ("model", "prompt_length"):  # as bbt tune's; any other setting goes through --set
        _add_setting(w, name, TuneConfig.model_fields[name])
    w.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="a tune setting for every cell (e.g. init=vocab alpha=0.5); KEY=V1,V2 makes it an axis of the grid")
    w.add_argument("--grid", metavar="FILE", help="a YAML or JSON file with any of tasks, seeds, methods, budgets, "
                   "model, data_root, settings (fixed), grid (setting -> list of values); flags given override it")
    w.add_argument("--test-limit", type=int, default=500, help="test examples per cell (a seeded sample; 0: all)")
    w.add_argument("--out", metavar="DIR", help="(required) the sweep folder")
    w.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="precision of the model run in the sweep's processes (bbt tune --dtype); a server runs its own")
    w.add_argument("--workers", type=int, default=1, help="cells at a time, each in its own process (torch threads "
                   "split between them); 1: in this process")
    w.add_argument("--ray", nargs="?", const=True, default=None, metavar="ADDRESS",
                   help="run cells as Ray tasks: on a local Ray, or on the cluster at ADDRESS (pip install 'bbt[ray]')")
    w.add_argument("--endpoint", nargs="+", default=[], metavar="URL", help="servers to run cells against (round robin)")
    w.add_argument("--api-key", default=os.environ.get("BBT_API_KEY"),
                   help="API key for --endpoint (default: $BBT_API_KEY; --help never prints it)")

    v = sub.add_parser("watch", help="a live view of a run or sweep folder",
                       description="Show a run's loss and dev score against queries, the budget spent and left, "
                       "queries per second and when tuning should end at that speed (a sweep: one line per cell), "
                       "redrawn as its log grows; returns when it ends, or fails (exit 1) when no process tunes the run any more "
                       "(it failed or was killed: bbt tune --resume continues it). A folder where no run has started yet is "
                       "waited for up to --wait seconds; a folder that holds something else is refused at once.")
    v.add_argument("folder", metavar="RUN_OR_SWEEP")
    v.add_argument("--interval", type=float, default=1.0, metavar="S", help="seconds between redraws")
    v.add_argument("--once", action="store_true", help="draw once and return")
    v.add_argument("--wait", type=float, default=60.0, metavar="S",
                   help="seconds to wait for a run to start in a folder that is not one yet (default 60)")

    s = sub.add_parser("serve", help="start the bundled inference server", description=(
        "Serve models over HTTP (protocol v1, OpenAPI page at /docs)."),
        formatter_class=_Help)
    s.add_argument("--model", action="append", metavar="[NAME=]PATH",
                   help=f"model to serve: {MODEL_CHOICE}; or a local directory or .gguf file, or NAME=PATH (repeat "
                   "for several)")
    s.add_argument("--host", default="127.0.0.1", help="interface to listen on")
    s.add_argument("--device", default="auto", metavar="DEV",
                   help="where the models run: auto (a GPU if torch sees one, else the CPU), cpu, cuda, cuda:N or mps")
    s.add_argument("--dtype", choices=["float32", "bfloat16", "auto"], default="float32",
                   help="precision of the models' layers: float32, bfloat16 (twice the queries/s of SmolLM2 on a CPU "
                   "with AVX-512 BF16; norms, softmax and read-out stay float32; answers move a little) or auto "
                   "(bfloat16 for causal LMs where the hardware pays, measured to keep SmolLM2's accuracy within 1 point; "
                   "float32 for the rest); stated in /v1/models")
    s.add_argument("--compile", action="store_true",
                   help="torch.compile the models' layer blocks at start (up to a minute): 1.03x to 1.12x the "
                        "queries/s of MiniLM on a CPU after that; needs a C++ compiler on a CPU")
    s.add_argument("--port", type=int, default=8000, help="port (0: any free port)")
    s.add_argument("--upstream", metavar="URL", help="run the layers on the vLLM server at URL (started with "
                   "--enable-prompt-embeds): this server keeps keys, quotas and z-encoded requests and sends vLLM prompt "
                   "embeddings; --model NAME=PATH is then vLLM's served name and where its tokenizer and input "
                   "embeddings are (input prompts only: BBT, not BBTv2)")
    s.add_argument("--api-keys", metavar="FILE", help="file with one allowed API key (or sha256:HEX of one) per line; "
                   "default: the keys in BBT_SERVER_API_KEYS (separated by commas or spaces), else no keys needed")
    s.add_argument("--max-candidates", type=int, default=256, help="candidates per request")
    s.add_argument("--max-examples", type=int, default=10000, help="inputs per request")
    s.add_argument("--max-body-mb", type=float, default=64.0, help="request body size in MB")
    s.add_argument("--quota", type=int, metavar="QUERIES",
                   help="queries (candidates scored) per API key per --quota-window; default: unlimited")
    s.add_argument("--quota-window", type=float, default=86400.0, metavar="SECONDS", help="length of a quota window")
    s.add_argument("--state", metavar="FILE",
                   help="SQLite file keeping each key's quota window and the answers to Idempotency-Key requests, so "
                   "that a restart (kill -9 included) neither resets what a key spent nor charges a retried request "
                   "twice; default: kept in memory, forgotten on restart")
    s.add_argument("--rate-limit", type=float, metavar="R",
                   help="requests per second per API key (bursts up to ceil(R)); default: unlimited")

    demo = sub.add_parser("demo", help="a short tuning run on the bundled demo task through a local server",
                          description="Start the bundled server on a free loopback port, tune the demo task through it, "
                          "and print accuracy before and after.", formatter_class=_Help)
    demo.add_argument("--budget", type=int, default=300, help="queries")
    demo.add_argument("--out", default="runs/demo", help="run folder")
    demo.add_argument("--in-process", action="store_true", help="skip the server; run the model in this process")
    return parser


def make_backend(args, *, answered_before: bool = False):
    """The backend the options name: --endpoint's server(s), else the model in this process.
    `answered_before`: the server is known to have answered (a resumed run's): it gets the whole
    --wait from the first request, where a new address gets a few seconds."""
    from bbt.backends.endpoints import open_backend
    from bbt.backends.http import FIRST_CONTACT_WAIT

    return open_backend(getattr(args, "endpoint", None), device=getattr(args, "device", None),
                        dtype=getattr(args, "dtype", None), engine=getattr(args, "engine", "auto"),
                        model_files=getattr(args, "model_files", None), api_key=args.api_key, timeout=args.timeout,
                        wait=args.wait, retries=args.retries,
                        first_contact_wait=None if answered_before else FIRST_CONTACT_WAIT)


def _option_errors(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        if not err["loc"]:  # a rule across several fields
            parts.append(err["msg"].removeprefix("Value error, "))
            continue
        field = str(err["loc"][-1])
        parts.append(f"{_flag(field)} {err.get('input')!r}: {err['msg']}")
    return "bad option " + "; ".join(parts)


# what `bbt tune --resume RUN` may be given: where the model is, the cache, the progress bar
_RESUME_OPTIONS = {"resume", "endpoint", "api_key", "timeout", "wait", "retries", "cache", "no_cache", "quiet", "command",
                   "report_to", "engine", "model_files"}


def cmd_tune(args) -> int:
    from bbt import api, rundir
    from bbt.data import limit_test, load_task_folder
    from bbt.tasks import resolve_task

    if args.resume:
        defaults = vars(build_parser().parse_args(["tune"]))
        changed = sorted(k for k, v in vars(args).items() if k not in _RESUME_OPTIONS and v != defaults.get(k))
        if changed:
            raise ConfigError("--resume takes the run's settings from RUN/config.json; drop "
                              + ", ".join("--" + k.replace("_", "-") for k in changed))
        saved = rundir.saved_run(args.resume)
        cfg, task, out, args.ensemble = saved.cfg, saved.task, Path(args.resume), saved.ensemble
        origin = saved.origin
        answered_before = bool(origin.endpoint) and args.endpoint in (None, origin.endpoint)
        _use_saved_endpoint(args, origin)
        args.test_limit = origin.test_limit
        args.dtype = origin.dtype  # a run continues in the precision it was paid in (None: before --dtype, float32)
        data_dir = origin.data
    else:
        for flag in ("data", "out"):
            if getattr(args, flag) is None:
                raise ConfigError(f"--{flag} is required (or continue a run with --resume RUN)")
        cfg, task, data_dir, out = _tune_config(args), resolve_task(args.task, args.data), args.data, Path(args.out)
        answered_before = False
    data = load_task_folder(data_dir, task, seed=cfg.seed, k=cfg.k_shot, skip_bad_rows=cfg.skip_bad_rows)
    data = limit_test(data, args.test_limit)
    if args.quiet and not args.endpoint:
        _hide_loading_bars()
    if cfg.method in GRADIENT_METHODS and args.dtype == "bfloat16":
        raise ConfigError(f"--method {cfg.method} trains in float32: --dtype bfloat16 is for bbt and bbtv2")
    if cfg.method in GRADIENT_METHODS:
        args.dtype = None  # auto too: backpropagation through bfloat16 is not measured
    backend = make_backend(args, answered_before=answered_before)
    try:
        # a gradient method trains in float32 in this process (run_gradient refuses an endpoint)
        dtype = "float32" if cfg.method in GRADIENT_METHODS else api.served_dtype(
            backend, cfg.model, args.dtype if args.endpoint else None,
            wanted_by=f"{out} was paid in" if args.resume else "--dtype")
        if args.dry_run:
            from bbt.estimate import estimate

            print(estimate(backend, cfg, task, data).describe())
            return 0
        backend = _with_cache(backend, args)
        origin = rundir.Origin(data=str(Path(data_dir).resolve()), endpoint=args.endpoint, dtype=dtype,
                               model_files=args.model_files, test_limit=args.test_limit)
        try:
            api.tune(cfg, task, data, backend, out, ensemble=args.ensemble, resume=bool(args.resume),
                     context=origin.record(), progress=not args.quiet, report_to=args.report_to)
        except BackendError as exc:
            raise BackendError(f"{exc}\n{_after_failure(out, cfg)}") from exc
        except KeyboardInterrupt:
            print(f"bbt tune: interrupted; {_after_failure(out, cfg)}", file=sys.stderr)
            return 130
    finally:
        backend.close()
    return 0


def _after_failure(out: Path, cfg: TuneConfig) -> str:
    """What a failed or interrupted `bbt tune` leaves behind, and the way on: resume advice only
    where a run folder holds something to resume (a run that spent nothing removes its folder)."""
    from bbt import rundir

    if not (rundir.is_run(out) or (out / rundir.INDEX_FILE).exists()):
        return f"nothing was spent, and no run folder is left at {out}: the same command starts afresh"
    if cfg.method in GRADIENT_METHODS:
        return f"what was spent is recorded in {out}; a gradient method does not resume: run it again with another --out"
    return f"what was spent is recorded in {out}; continue with: bbt tune --resume {out}"


def _hide_loading_bars() -> None:
    """--quiet: no bars from loading a model in this process either (transformers' weight loading,
    its GGUF conversion, which draws a plain tqdm bar)."""
    import importlib

    if "tqdm" not in sys.modules:  # tqdm reads TQDM_* into its defaults when it is imported
        os.environ["TQDM_DISABLE"] = "1"
    if "huggingface_hub" not in sys.modules:  # read when it is imported, by transformers too
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    else:
        importlib.import_module("huggingface_hub.utils").disable_progress_bars()
    if "transformers" in sys.modules:
        importlib.import_module("transformers.utils.logging").disable_progress_bar()


def _tune_config(args) -> TuneConfig:
    """The TuneConfig of `bbt tune`'s options (those given, and the defaults of the rest); a bad
    value gets one line naming its option."""
    # the rules Budget enforces, in the words of the command line
    if args.max_cost is not None and not args.price_per_1k_tokens:
        raise ConfigError("--max-cost needs --price-per-1k-tokens: without a price nothing is charged against it")
    if all(v is None for v in (args.budget, args.max_requests, args.max_examples, args.max_tokens, args.max_cost)):
        raise ConfigError("--budget none needs another limit (--max-requests, --max-examples, --max-tokens or "
                          "--max-cost), else tuning never stops")
    try:
        budget = Budget(**{name: getattr(args, _dest(name)) for name in _BUDGET_FLAGS})
        given = {name: getattr(args, name) for name in TuneConfig.model_fields
                 if name != "budget" and getattr(args, name) is not None}
        return TuneConfig(**given, budget=budget)
    except ValidationError as exc:  # e.g. --popsize 1, --budget 0: one line naming the option, no traceback
        raise ConfigError(_option_errors(exc)) from None


def _with_cache(backend, args):
    """The backend behind the evaluation cache that --cache / --no-cache / $BBT_CACHE choose."""
    from bbt.cache import with_cache

    return with_cache(backend, args.cache, enabled=not args.no_cache,
                      warn=lambda line: print(f"warning: {line}", file=sys.stderr))


def cmd_evaluate(args) -> int:
    from bbt import api, rundir

    _tuned_through(args, rundir.member_runs(args.run)[0], "evaluate")
    if args.quiet and not args.endpoint:
        _hide_loading_bars()
    backend = make_backend(args)
    try:
        result = api.evaluate(args.run, split=args.split, data=args.data, vote=args.vote, backend=backend,
                              progress=not args.quiet)
    finally:
        backend.close()
    print(json.dumps(result, indent=2))
    return 0


def cmd_predict(args) -> int:
    from bbt import api, rundir
    from bbt.rundir import is_gradient_run, load_artifact, load_run_config
    from bbt.protocol import TaskSpec

    run_dirs, given = args.run, list(args.texts)
    if not run_dirs:  # bbt predict RUN TEXT ...
        if len(given) < 2:
            raise ConfigError("give a run folder and texts: bbt predict RUN TEXT ... (or --run RUN; - reads the texts "
                              "from standard input)")
        run_dirs, given = [given[0]], given[1:]
    runs = rundir.member_runs(run_dirs)
    if len(runs) == 1 and is_gradient_run(runs[0]):
        task = TaskSpec.model_validate(load_run_config(runs[0])["task"])
    else:
        task = load_artifact(runs[0]).task
    all_texts = _read_texts(given)
    texts, pairs = all_texts, None
    if task.pair:
        split = [t.split(" ||| ", 1) for t in all_texts]
        if any(len(s) != 2 for s in split):
            raise BBTError(f"task {task.name!r} takes pairs: write each as 'TEXT ||| PAIR'")
        texts, pairs = [s[0] for s in split], [s[1] for s in split]
    if not texts:
        raise ConfigError("no texts to label: standard input was empty")
    for i, text in enumerate(texts):  # refused as the data loader refuses such a row
        empty = "text" if not text.strip() else "text_pair" if pairs and not pairs[i].strip() else None
        if empty:
            raise ConfigError(f"text {i + 1}: '{empty}' is missing or empty; the model has nothing to read")
    _tuned_through(args, runs[0], "predict")
    backend = make_backend(args)
    try:
        for text, row in zip(all_texts, api.predict(run_dirs, texts, pairs=pairs, vote=args.vote, backend=backend)):
            print(json.dumps({**row, "text": text}))
    finally:
        backend.close()
    return 0


def _read_texts(given: list[str]) -> list[str]:
    """The texts of `bbt predict`: `-` stands for standard input, one text a line."""
    if given.count("-") > 1:
        raise ConfigError("give - once: it reads every text from standard input")
    if "-" not in given:
        return given
    at = given.index("-")
    return given[:at] + sys.stdin.read().splitlines() + given[at + 1 :]


def _tuned_through(args, run: Path, command: str) -> None:
    """Unless --endpoint or --in-process says where the model is, point `args` at the server a run
    was tuned through (its config.json: endpoint, engine and model files), said on stderr; left
    alone for a run tuned in process (or a folder with a prompt.json alone, which does not say)."""
    from bbt.rundir import origin_of

    if args.in_process and args.endpoint:
        raise ConfigError("--in-process runs the model here and --endpoint asks a server: give one of them")
    origin = origin_of(run)
    if args.dtype is None and not args.endpoint:
        args.dtype = origin.dtype  # scored in the precision it was tuned in
    if args.endpoint or args.in_process or not origin.endpoint:
        return
    print(f"bbt {command}: {run} was tuned through {', '.join(origin.endpoint)}: asking it there (give --endpoint "
          "URL for another server, or --in-process to load the model here)", file=sys.stderr)
    _use_saved_endpoint(args, origin)


def _use_saved_endpoint(args, origin) -> None:
    """The endpoint, engine and model files a run's origin (`rundir.Origin`) records, where the
    options leave them open."""
    args.endpoint = args.endpoint or origin.endpoint
    args.model_files = args.model_files or origin.model_files
    if args.engine == "auto":
        args.engine = origin.engine_choice


def cmd_export(args) -> int:
    from bbt import export, rundir

    run, out = Path(args.run), Path(args.out)
    pairs = [(run, out)]
    if (run / rundir.INDEX_FILE).exists():
        pairs = [(m, out / m.name) for m in rundir.member_runs([run])]
    for src, dst in pairs:
        written = export.to_peft(src, dst, args.base_model) if args.format == "peft" else export.to_bbt(src, dst)
        print(f"wrote {written}")
    return 0


def _sweep_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def cmd_sweep(args) -> int:
    from bbt import sweeps

    if not args.out:
        raise ConfigError("--out is required: the sweep folder")
    spec_fields: dict = {}
    if args.grid:
        import yaml

        try:
            loaded = yaml.safe_load(Path(args.grid).read_text())
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read the grid file {args.grid}: {exc}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{args.grid} must hold a mapping (tasks, seeds, methods, budgets, settings, grid)")
        unknown = set(loaded) - set(sweeps.SweepSpec.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"{args.grid}: unknown keys {sorted(unknown)}")
        spec_fields.update(loaded)
    defaults = vars(build_parser().parse_args(["sweep"]))
    for name in ("tasks", "seeds", "methods", "budgets", "model", "data_root", "test_limit"):
        value = getattr(args, name)
        if value is not None and (name not in spec_fields or value != defaults.get(name)):
            spec_fields[name] = value
    settings, grid = dict(spec_fields.get("settings", {})), dict(spec_fields.get("grid", {}))
    if args.prompt_length is not None:
        settings["prompt_length"] = args.prompt_length
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r}: write KEY=VALUE")
        values = [_sweep_value(v) for v in value.split(",")]
        if len(values) > 1:
            grid[key] = values
        else:
            settings[key] = values[0]
    spec_fields.update(settings=settings, grid=grid, endpoints=args.endpoint, api_key=args.api_key)
    if args.dtype != defaults["dtype"] or "dtype" not in spec_fields:
        spec_fields["dtype"] = args.dtype
    if not spec_fields.get("tasks") or not spec_fields.get("data_root"):
        raise ConfigError("a sweep needs --tasks and --data-root (or a --grid file with them)")
    spec_fields["test_limit"] = spec_fields.get("test_limit") or None
    spec = sweeps.SweepSpec(**spec_fields)
    try:
        spec.check()
    except ValidationError as exc:
        raise ConfigError(_option_errors(exc)) from None
    outcome = sweeps.run_sweep(spec, args.out, workers=args.workers, ray=args.ray)
    print(sweeps.format_table(sweeps.table(args.out)))
    if (line := sweeps.describe_unchecked(args.out)) is not None:
        print(line)
    return 1 if outcome.failed else 0


def cmd_sweep_report(argv: list[str]) -> int:
    from bbt import sweeps

    p = argparse.ArgumentParser(prog="bbt sweep report", description="The table of a sweep folder: test metric per "
                                "task, method, settings and budget, mean ± standard error over seeds, the no-prompt "
                                "baseline and the paired gap to it.")
    p.add_argument("folder", metavar="DIR")
    p.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    p.add_argument("--plot", metavar="FILE", help="also plot metric against queries (PNG; needs matplotlib)")
    args = p.parse_args(argv)
    sweeps.load_spec(Path(args.folder))
    lines = sweeps.table(args.folder)
    print(sweeps.format_table(lines))
    for name, why in sweeps.failures(args.folder).items():
        print(f"failed: {name}: {why}")
    if (line := sweeps.describe_unchecked(args.folder)) is not None:
        print(line)
    if args.csv:
        sweeps.write_csv(lines, args.csv)
        print(f"csv: {args.csv}")
    if args.plot:
        sweeps.plot(lines, args.plot)
        print(f"plot: {args.plot}")
    return 0


def cmd_watch(args) -> int:
    from bbt import watch

    watch.watch(args.folder, interval=args.interval, once=args.once, wait=args.wait)
    return 0


def cmd_serve(args) -> int:
    try:
        from servers.app import serve
    except ImportError as exc:
        raise BBTError(f"bbt serve needs the server extra ({exc.name} is missing): pip install 'bbt[server]'") from None
    serve(models=args.model or ([] if args.upstream else [DEFAULT_MODEL]), host=args.host, port=args.port, api_keys_file=args.api_keys,
          max_candidates=args.max_candidates, max_examples=args.max_examples, max_body_mb=args.max_body_mb,
          quota=args.quota, quota_window=args.quota_window, rate_limit=args.rate_limit, device=args.device,
          compile=args.compile, upstream=args.upstream, dtype=args.dtype, state=args.state)
    return 0


def cmd_demo(args) -> int:
    from bbt.demo import run_demo

    return run_demo(budget=args.budget, out=args.out, in_process=args.in_process)


COMMANDS = {"tune": cmd_tune, "evaluate": cmd_evaluate, "predict": cmd_predict, "export": cmd_export, "sweep": cmd_sweep,
            "watch": cmd_watch, "serve": cmd_serve,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["sweep", "report"]:
        try:
            return cmd_sweep_report(argv[2:])
        except BBTError as exc:
            print(f"bbt sweep report: error: {exc}", file=sys.stderr)
            return 1
    parser = build_parser()
    args = parser.parse_args(argv)
    # the HTTP client says what it waits for (a server restarting, a rate limit) on stderr
    logging.basicConfig(level=logging.WARNING, format="bbt: %(message)s")
    if args.command is None:
        parser.print_help()
        return 2
    try:
        return COMMANDS[args.command](args)
    except BBTError as exc:
        print(f"bbt {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        more = "; the run folders keep what was spent so far: rerun the same command to finish" if args.command == "sweep" else ""
        print(f"bbt {args.command}: interrupted{more}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
