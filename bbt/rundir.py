"""The run folder: what each file is called, and the files bbt reads back (docs/runs.md).

    RUN/config.json    the TuneConfig, task and data the run used
    RUN/ledger.jsonl   one line per request: what it cost, fsynced before the next request goes out
    RUN/log.jsonl      one line per generation
    RUN/state.json     the search after its last complete generation (what --resume continues;
                       its CMA-ES states and arrays in RUN/state.parts/: `bbt.checkpoint`)
    RUN/prompt.json    the artifact: z, projection specs, model, task (versioned: PromptArtifact)
    RUN/prompt.safetensors  the prompt as the model received it, p0 + A z: "prompts" [layers, L, H]
    RUN/path.json      each time the prompt to return changed: queries used and z (the prompt at a smaller budget)
    RUN/metrics.json   scores, baselines, spending and timings (versioned: RunMetrics)
    RUN/running.json   while a process tunes the run: its host and pid (a watcher tells a run in
                       progress from one that died)
    RUN/adapter/       a gradient baseline's PEFT adapter, in place of the prompt files
    OUT/ensemble.json  an ensemble: its member run folders (OUT/member-1, ...)

This module writes nothing but metrics.json and the ensemble index, and imports no other module
that knows a run folder, so every module that does can import it.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from bbt import jsonfile
from bbt.config import TuneConfig
from bbt.errors import ConfigError
from bbt.prompt import Prompt
from bbt.protocol import ProjectionSpec, TaskSpec

CONFIG_FILE = "config.json"
LEDGER_FILE = "ledger.jsonl"
LOG_FILE = "log.jsonl"
STATE_FILE = "state.json"
ARTIFACT_FILE = "prompt.json"
PROMPTS_FILE = "prompt.safetensors"
PATH_FILE = "path.json"
METRICS_FILE = "metrics.json"
ADAPTER_DIR = "adapter"
INDEX_FILE = "ensemble.json"
OWNER_FILE = "running.json"
# what a tuning run writes, in the order it writes them (removed again when it fails before spending)
RUN_FILES = (CONFIG_FILE, LEDGER_FILE, LOG_FILE, STATE_FILE, ARTIFACT_FILE, PROMPTS_FILE, PATH_FILE, METRICS_FILE,
             OWNER_FILE)

ARTIFACT_VERSION = 1
METRICS_VERSION = 1
INDEX_VERSION = 1


# ---- prompt.json ----------------------------------------------------------------------------

class PromptArtifact(BaseModel):
    """prompt.json: everything needed to use a tuned prompt again (A is rebuilt from its seed)."""

    model_config = ConfigDict(extra="ignore", protected_namespaces=())

    version: int = ARTIFACT_VERSION
    method: str
    model: str
    task: TaskSpec
    prompt_length: int
    z: list[list[float]]  # (layers, d)
    projections: list[ProjectionSpec]
    init_seed: int | None = None  # p0: the server's vocabulary embeddings drawn with this seed; none: zeros
    init_text: str | None = None  # p0: the embeddings of this text's last L tokens (repeated if shorter)
    # where the prompt sits (`ModelInfo.prompt_placement`): after `prompt_position` leading special tokens
    prompt_placement: str | None = None
    prompt_position: int | None = None
    # the task with its own words, where `task` holds words chosen on train (`--verbalizer auto`):
    # the plain-model baseline is read through these, as in metrics.json's no_prompt_test_acc
    plain_task: TaskSpec | None = None

    def prompt(self) -> Prompt:
        return Prompt(z=np.asarray(self.z, dtype=np.float64), projections=self.projections,
                      prompt_length=self.prompt_length, init_seed=self.init_seed, init_text=self.init_text)


def load_artifact(run: str | Path) -> PromptArtifact:
    """The prompt.json of a run folder, with a clear error for a missing or bad file."""
    path = Path(run) / ARTIFACT_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run} is not a run folder: {path} is missing (run bbt tune --out {run} first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path} is not valid JSON ({exc}): {_rebuild_hint(Path(run))}") from exc
    if isinstance(data, dict) and data.get("version", 0) > ARTIFACT_VERSION:
        warnings.warn(f"{path} was written by a newer bbt (format {data['version']}); reading what this version knows",
                      stacklevel=2)
    try:
        return PromptArtifact.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{path} is not a bbt prompt artifact ({exc.errors()[0]['msg']} at {exc.errors()[0]['loc']}): "
                          f"{_rebuild_hint(Path(run))}") from exc


def _rebuild_hint(run: Path) -> str:
    """The way on from a damaged RUN/prompt.json: write it again from the run's last checkpoint, or tune again."""
    if (run / STATE_FILE).exists():
        return (f"delete it and {run / METRICS_FILE}, then bbt tune --resume {run} writes both again from the run's "
                "last checkpoint (no tuning query is spent again; the test split is scored again)")
    return "the run keeps no checkpoint to write it again from: tune again, with another --out"


def prompt_at(run: str | Path, queries: int) -> Prompt:
    """The prompt a finished run would have returned with a budget of `queries` (RUN/path.json)."""
    artifact = load_artifact(run)
    try:
        points = json.loads((Path(run) / PATH_FILE).read_text())["points"]
    except FileNotFoundError:
        raise ConfigError(f"{run} has no {PATH_FILE}: it did not finish, or an older bbt made it") from None
    prompt = artifact.prompt()
    z = next((p["z"] for p in reversed(points) if p["queries"] <= queries), None)
    prompt.z = np.zeros_like(prompt.z) if z is None else np.asarray(z, dtype=np.float64)
    return prompt


# ---- config.json ----------------------------------------------------------------------------

def load_run_config(run: str | Path) -> dict:
    """RUN/config.json as written: bbt_version, run_id, config (a TuneConfig), task, data, endpoint, ..."""
    path = Path(run) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{run} is not a run folder: {path} is missing") from None


class Origin(BaseModel):
    """Where a run's data and model came from, as config.json (an ensemble's ensemble.json) records
    them beside its settings: what `bbt tune --resume`, `bbt.resume` and the scoring commands read
    to go back to the same data, server and precision."""

    model_config = ConfigDict(extra="ignore")

    data: str | None = None  # the data folder, resolved
    endpoint: list[str] | None = None  # the server(s) it was tuned through; None: in process
    engine: str | None = None  # what answered ("bbt", "vllm ..."), written by the run itself
    model_files: str | None = None  # a vLLM run's tokenizer and input embeddings
    dtype: str | None = None  # the precision it was paid in (None: before --dtype, float32; or an engine's own)
    test_limit: int | None = None  # test examples scored (a seeded sample), None: all

    @field_validator("endpoint", mode="before")
    @classmethod
    def _listed(cls, v):  # bbt demo's run folders recorded their one URL bare
        return [v] if isinstance(v, str) else v

    def record(self) -> dict:
        """The keys a new run writes into config.json (the engine it writes itself, from the server's answer)."""
        out = {"data": self.data, "endpoint": self.endpoint, "dtype": self.dtype}
        return out | {k: v for k, v in (("model_files", self.model_files), ("test_limit", self.test_limit)) if v}

    @property
    def engine_choice(self) -> str:
        """The engine to ask for when going back: a run tuned on vLLM stays on vLLM even while the
        engine is down (auto would have to recognise it from an answer)."""
        return "vllm" if str(self.engine or "").startswith("vllm") else "auto"


def origin_of(run: str | Path) -> Origin:
    """Where the run in folder `run` came from (its config.json); nothing known for a folder that is
    not a run's (an exported prompt)."""
    return Origin.model_validate(load_run_config(run)) if is_run(run) else Origin()


@dataclass(frozen=True)
class SavedRun:
    """What continues a run folder or an ensemble folder: its settings, task and origin."""

    cfg: TuneConfig
    task: TaskSpec
    origin: Origin
    ensemble: int | None  # an ensemble folder: its members


def saved_run(run: str | Path) -> SavedRun:
    """RUN/config.json (OUT/ensemble.json for an ensemble) read and checked, with what is missing said."""
    index = Path(run) / INDEX_FILE
    try:
        saved = json.loads(index.read_text()) if index.exists() else load_run_config(run)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{index} is not a bbt ensemble index: {exc}") from None
    name = index if index.exists() else Path(run) / CONFIG_FILE
    try:
        cfg, task = TuneConfig.model_validate(saved["config"]), TaskSpec.model_validate(saved["task"])
        origin = Origin.model_validate(saved)
    except (KeyError, ValidationError) as exc:
        raise ConfigError(f"{name} is not a bbt run config: {exc}") from None
    if not origin.data:
        raise ConfigError(f"{name} does not say which data folder the run used")
    return SavedRun(cfg, task, origin, len(saved["members"]) if index.exists() else None)


def is_run(folder: str | Path) -> bool:
    """Whether `folder` holds a run's config (a run started there, finished or not)."""
    return (Path(folder) / CONFIG_FILE).exists()


@contextlib.contextmanager
def running(folder: str | Path):
    """RUN/running.json names this process (host and pid) while the block runs: a run tuned, or
    one killed (then the pid is gone), as opposed to one that ended or stopped on an error."""
    path = Path(folder) / OWNER_FILE
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def owner_alive(owner: dict) -> bool:
    """Whether the process a {"host", "pid"} record names may be alive: by its pid on this host; on
    another host it cannot be checked from here, so yes. (running.json, a sweep cell's claim)"""
    return owner.get("host") != socket.gethostname() or _pid_alive(int(owner.get("pid", -1)))


def _pid_alive(pid: int) -> bool:
    """Whether process `pid` of this host is alive (one of another user's counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def being_tuned(folder: str | Path) -> bool:
    """Whether a process is tuning the run in `folder` now: its running.json names a live process
    (or one on another host, which cannot be checked from here)."""
    try:
        owner = json.loads((Path(folder) / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return False
    if not isinstance(owner, dict) or not isinstance(owner.get("pid"), int):
        return False
    return owner_alive(owner)


def is_gradient_run(run: str | Path) -> bool:
    """A folder written by a gradient baseline (a PEFT adapter, no bbt prompt)."""
    return (Path(run) / ADAPTER_DIR).is_dir() and not (Path(run) / ARTIFACT_FILE).exists()


# ---- metrics.json ---------------------------------------------------------------------------

class RunMetrics(BaseModel):
    """RUN/metrics.json: what a finished run scored, spent and took. One schema for the three kinds
    of run (a search, a gradient baseline, an ensemble); each writes the fields that apply to it
    and no other. Accuracies are fractions in [0, 1]; None: not measured. docs/runs.md lists them."""

    model_config = ConfigDict(extra="forbid")

    version: int = METRICS_VERSION
    method: str | None = None  # gradient baselines: the PEFT method
    members: int | None = None  # ensembles: how many prompts voted
    # scores of the tuned prompt, the untuned one (z = 0) and the model without a soft prompt
    train_acc: float | None = None
    dev_acc: float | None = None
    test_acc: float | None = None  # an ensemble: its majority vote
    zero_prompt_test_acc: float | None = None
    no_prompt_test_acc: float | None = None
    no_prompt_dev_acc: float | None = None
    no_prompt_verbalizer_test_acc: float | None = None  # --verbalizer auto: the plain model, chosen words
    test_split: str | None = None  # "dev" for a folder without a test set
    metric: str | None = None  # ensembles: acc or f1, what the vote fields hold
    dtype: str | None = None  # the precision the model ran in (None: an upstream engine's own)
    train_loss: float | None = None
    dev_loss: float | None = None
    test_loss: float | None = None
    train_f1: float | None = None  # F1 tasks
    dev_f1: float | None = None
    test_f1: float | None = None
    zero_prompt_test_f1: float | None = None
    no_prompt_test_f1: float | None = None
    no_prompt_dev_f1: float | None = None
    # ensembles
    test_acc_majority_vote: float | None = None
    test_acc_mean_vote: float | None = None
    test_f1_majority_vote: float | None = None
    test_f1_mean_vote: float | None = None
    member_test: list[float] | None = None
    mean_member_test: float | None = None
    best_dev_member: int | None = None  # 1-based
    best_dev_member_test: float | None = None
    # the search
    queries_used: int | None = None
    queries_paid: int | None = None
    generations: int | None = None
    stop_reason: str | None = None  # budget, rounds, patience; a gradient run's: epochs, patience
    fold: int | None = None
    held_out_check: dict[str, Any] | None = None
    verbalizer: dict[str, Any] | None = None
    spending: dict[str, Any] | None = None
    # gradient baselines
    epochs: int | None = None
    best_epoch: int | None = None
    forward_passes: int | None = None
    backward_passes: int | None = None
    examples_seen: int | None = None
    trainable_parameters: int | None = None
    learning_rate: float | None = None
    optimizer: str | None = None
    # time
    tuning_seconds: float | None = None
    queries_per_second: float | None = None
    wall_seconds: float | None = None


def write_metrics(run: str | Path, **fields) -> dict:
    """Validate `fields` against RunMetrics and write them, with the schema's version, as
    RUN/metrics.json (strict JSON: a value that is not finite as null); returns what was written.
    Only the fields given are written, None included."""
    m = RunMetrics.model_validate({"version": METRICS_VERSION, **fields})
    out = m.model_dump(exclude_unset=True)
    jsonfile.write(Path(run) / METRICS_FILE, out, indent=2)
    return out


def read_metrics(run: str | Path) -> dict | None:
    """RUN/metrics.json as a dict, or None while the run has not finished."""
    path = Path(run) / METRICS_FILE
    return json.loads(path.read_text()) if path.exists() else None


# ---- ensemble.json --------------------------------------------------------------------------

def write_index(folder: Path, members: list[str], **extra) -> None:
    """ensemble.json: the member run folders (relative to `folder`) and how the ensemble was made."""
    (folder / INDEX_FILE).write_text(json.dumps({"version": INDEX_VERSION, "members": members, **extra}, indent=1))


def member_runs(runs: list[str | Path]) -> list[Path]:
    """Run folders named on the command line, an ensemble folder standing for its members."""
    out: list[Path] = []
    for run in map(Path, runs):
        index = run / INDEX_FILE
        if index.is_file():
            try:
                data = json.loads(index.read_text())
                out += [run / m for m in data["members"]]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise ConfigError(f"{index} is not a bbt ensemble index: {exc}") from None
        else:
            out.append(run)
    return out
