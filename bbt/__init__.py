"""bbt: black-box tuning of language models served as an API (BBT, BBTv2).

The client library imports no torch: CMA-ES (pycma) proposes intrinsic vectors z, a seeded
random projection maps them to soft prompts, and a Backend scores each population, either in
this process or on a server over HTTP.
"""

from bbt.api import evaluate, local, predict, remote, resume, run
from bbt.budget import Budget, Ledger
from bbt.cache import CachedBackend, EvaluationCache
from bbt.config import TuneConfig
from bbt.data import Split, TaskData, k_shot, load_file, load_task_folder
from bbt.errors import (
    AuthError,
    BackendError,
    BBTError,
    ConfigError,
    DataError,
    ModelNotFound,
    QuotaExhausted,
    RequestRejected,
    ServerUnavailable,
)
from bbt.optimizer import CMAES
from bbt.projection import build_matrix, normal_spec, project, uniform_spec
from bbt.tasks import BUILTIN_TASKS, load_task_file, resolve_task
from bbt.prompt import Prompt
from bbt.sweeps import sweep
from bbt.tuner import TuneResult, TuneState, tune
from bbt.version import __version__

__all__ = sorted([
    "AuthError", "BBTError", "BUILTIN_TASKS", "BackendError", "Budget", "CMAES", "CachedBackend", "EvaluationCache", "ConfigError", "DataError",
    "Ledger", "ModelNotFound", "Prompt", "QuotaExhausted", "RequestRejected", "ServerUnavailable", "Split", "TaskData",
    "TuneConfig", "TuneResult", "TuneState", "__version__", "build_matrix", "k_shot", "load_file", "load_task_file",
    "load_task_folder", "normal_spec", "project", "resolve_task", "tune", "uniform_spec",
    "evaluate", "local", "predict", "remote", "resume", "run", "sweep",
])
