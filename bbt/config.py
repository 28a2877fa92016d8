"""Settings of a tuning run, as one validated model (what config.json of a run folder holds)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from bbt.budget import Budget
from bbt.errors import ConfigError
from bbt.protocol import LossKind


GRADIENT_METHODS = ("prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2")


# The model a run tunes when none is named: SmolLM2-135M-Instruct, where black-box tuning gains most
# among the bundled models (500 queries: +5.9 points on SST-2, +11.5 on AG News, against +0.5 on
# SST-2 for MiniLM; docs/models.md). `bbt serve`, `bbt sweep` and the Python API default to it too.
DEFAULT_MODEL = "smollm2"


class TuneConfig(BaseModel):
    """Everything that decides a tuning run. The same config and seed give the same run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default=DEFAULT_MODEL, description="model name or local path (the server's name with an "
                       "endpoint): smollm2 (the default), minilm, a folder or a .gguf file")
    method: Literal["bbt", "bbtv2", "prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"] = Field(
        default="bbt",
        description="bbt: input prompt; bbtv2: a prompt per layer; the rest: gradient baselines through PEFT "
        "(in process only: they need the weights)",
    )
    seed: int = Field(default=42, ge=0, description="seeds the data split, p0, and (unless search_seed) the search")
    search_seed: int | None = Field(
        default=None, ge=0,
        description="seeds the projections and CMA-ES apart from the split, so prompts tuned on one split can "
        "differ (ensembles); none: the split seed",
    )
    prompt_length: int = Field(default=50, ge=1, description="L, soft-prompt tokens")
    intrinsic_dim: int = Field(default=500, ge=1, description="d, the dimension CMA-ES searches")
    popsize: int = Field(
        default=20, ge=3,
        description="candidates per generation (queries per request); at least 3: with 2, pycma's two-point step-size "
        "rule (chosen for d >= 300) fails",
    )
    sigma: float = Field(default=1.0, gt=0, description="CMA-ES initial step size")
    loss: LossKind = Field(default="ce", description="ce, hinge (margin 2) or perf (negative accuracy)")
    projection: Literal["normal", "uniform"] = Field(
        default="normal", description="normal: std alpha*sigma_hat/(sqrt(d)*sigma); uniform: PyTorch Linear init"
    )
    init: Literal["zero", "vocab", "instruction", "demos"] = Field(
        default="zero",
        description="p0: zeros; embeddings of random vocabulary tokens (as in BBT); of an instruction text "
        "(init_text, or the task's default); or of training examples written out as demonstrations",
    )
    init_text: str | None = Field(default=None, min_length=1, description="the instruction of init 'instruction'")
    verbalizer: Literal["manual", "auto"] = Field(
        default="auto",
        description="auto: several words per class chosen on the training split, their number by accuracy on "
        "held-out train folds and dev (bbt.verbalizers; 2 queries, an LM 3; the gradient methods: manual); "
        "manual: the task's label words (or label texts)",
    )
    label_words: int | None = Field(
        default=None, ge=1, le=32, description="verbalizer auto: words per class; none: chosen from 1, 2, 3, 5, 8 on held-out train folds + dev"
    )
    select: Literal["dev-metric", "dev-loss", "train-dev"] = Field(
        default="dev-metric",
        description="which candidate a run returns, among the bests on train scored on dev: the best on dev by the "
        "task's metric (ties: lower dev loss); by dev loss alone (smoother than the metric on 32 examples); or by "
        "the metric on train and dev together (ties: lower loss on both), twice the inputs of dev alone",
    )
    folds: Literal[1, 2] = Field(
        default=1,
        description="2: train and dev swap roles halfway through the query budget (the second half searches on dev "
        "from z = 0 and checks on train); the prompt returned is the better of the two by its held-out score",
    )
    local: Literal["none", "cobyla"] = Field(
        default="none",
        description="a second search stage for bbt: COBYLA (scipy) from CMA-ES's best point, in the local_dim "
        "principal directions of its covariance, for the last local_share of the query budget",
    )
    local_share: float = Field(default=0.3, gt=0, lt=1, description="share of the query budget the second stage gets")
    local_dim: int = Field(default=20, ge=1, description="directions the second stage searches")
    alpha: float = Field(default=1.0, gt=0, description="scale of the normal projection")
    bound: float | None = Field(default=None, gt=0, description="keep z in [-bound, bound]; none: unbounded")
    diagonal: bool = Field(default=False, description="separable CMA-ES (diagonal covariance), for large d")
    encoding: Literal["intrinsic", "float32", "float16"] = Field(
        default="intrinsic", description="how candidates travel: z + projection seed, or prompts as float32/float16"
    )
    rounds: int | None = Field(
        default=None, ge=1,
        description="stop after this many rounds, a round being one generation per prompted layer "
        "(BBT: one generation; BBTv2: one per layer, bottom to top); none: when the budget ends",
    )
    patience: int | None = Field(
        default=None, ge=1,
        description="stop after this many generations in a row without a better dev score (BBTv2: generations, "
        "not rounds); none: run to the budget",
    )
    lr: float | None = Field(default=None, gt=0, description="gradient methods: learning rate (none: the paper's)")
    epochs: int = Field(default=30, ge=1, description="gradient methods: passes over the training split")
    batch_size: int = Field(default=8, ge=1, description="gradient methods: examples per step")
    k_shot: int = Field(default=16, ge=1, description="examples per class when a split is sampled from a pool")
    skip_bad_rows: bool = Field(
        default=False,
        description="leave out data rows whose text (or text_pair) is missing, empty or too long, and say how many "
        "per file; false: such a row stops the run, naming its file and line",
    )
    budget: Budget = Field(default_factory=Budget)

    @property
    def search(self) -> int:
        """The seed of the projections and CMA-ES."""
        return self.seed if self.search_seed is None else self.search_seed

    @model_validator(mode="after")
    def _text_needs_instruction(self) -> TuneConfig:
        if self.init_text is not None and self.init != "instruction":
            raise ValueError(f"init_text is the instruction of init 'instruction'; init is {self.init!r}")
        if self.local != "none" and self.method != "bbt":
            raise ValueError(f"local (a second search stage) is for method 'bbt'; method is {self.method!r}")
        if self.local != "none" and self.budget.queries is None:
            raise ValueError("local takes a share of the query budget: give a budget in queries")
        if self.folds == 2 and self.budget.queries is None:
            raise ValueError("folds 2 splits the query budget in halves: give a budget in queries")
        if self.folds == 2 and self.local != "none":
            raise ValueError("folds 2 and a second stage (local) both split the budget; choose one")
        if self.label_words is not None and self.verbalizer != "auto":
            raise ValueError("label_words is the number of words of verbalizer 'auto'; verbalizer is 'manual'")
        return self


# Settings that differ by model family where a setting is not given (chosen on SmolLM2's 16-shot
# train + dev splits and checked on held-out seeds; BBTv2 by the means of 3 seeds x SST-2, AG News
# and RTE: see the README's results). A given setting wins.
FAMILY_DEFAULTS: dict[str, dict] = {
    "causal": {"method": "bbtv2", "prompt_length": 10, "init": "instruction", "alpha": 0.5},
}


def with_family_defaults(cfg: TuneConfig, family: str, modes: list[str] | None = None) -> TuneConfig:
    """`cfg` with its model family's defaults for every setting it was not given (`model_fields_set`),
    and the task's own words for a gradient method (its words are trained, not chosen by queries).
    `modes` (`ModelInfo.modes`): a default method the endpoint cannot run is not applied."""
    missing = {k: v for k, v in FAMILY_DEFAULTS.get(family, {}).items() if k not in cfg.model_fields_set}
    if modes is not None and "method" in missing and missing["method"] not in modes:
        missing.pop("method")  # e.g. vLLM takes input prompts only: its causal LM is tuned with BBT
    if cfg.method in GRADIENT_METHODS and "verbalizer" not in cfg.model_fields_set:
        missing["verbalizer"] = "manual"
    if "init" in missing and cfg.init_text is not None:
        missing.pop("init")
    if "method" in missing and cfg.local != "none":
        missing.pop("method")  # a second search stage is BBT's: asking for it asks for BBT
    return cfg.model_copy(update=missing) if missing else cfg


def check_mode(cfg: TuneConfig, info) -> None:
    """Refuse, before anything is spent, a black-box method the endpoint cannot run (`ModelInfo.modes`)."""
    if cfg.method in GRADIENT_METHODS or cfg.method in info.modes:
        return
    if info.engine != "bbt":
        raise ConfigError(
            f"--method {cfg.method} puts a prompt at every layer, but {info.name!r} runs on {info.engine}, which takes "
            "soft prompts only as prompt embeddings: they reach the input layer alone. Use --method bbt against it, or "
            "serve the model with bbt's own engine (bbt serve --model ...) for BBTv2")
    raise ConfigError(f"--method {cfg.method}: model {info.name!r} supports {', '.join(info.modes)}")
