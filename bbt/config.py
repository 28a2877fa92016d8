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

# which bundled model suits what (the help of --model in bbt tune, sweep and serve; figures: docs/models.md)
MODEL_CHOICE = (f"{DEFAULT_MODEL} (the default; SmolLM2-135M-Instruct, a 135M causal LM, where tuning gains most: "
                "+5.9 points on SST-2 and +11.5 on AG News at 500 queries; BBT and BBTv2) or minilm (all-MiniLM-L6-v2, "
                "a small sentence encoder: fast, with less to gain from tuning, +0.5 points on SST-2)")


# a setting that means something only with another: given, it sets that one (unless also given)
IMPLIES: dict[str, tuple[str, str]] = {
    "init_text": ("init", "instruction"),
    "label_words": ("verbalizer", "auto"),
    "local_share": ("local", "cobyla"),
    "local_dim": ("local", "cobyla"),
}


class TuneConfig(BaseModel):
    """Everything that decides a tuning run. The same config and seed give the same run.

    Each field is a `bbt tune` option of the same name (`prompt_length` is `--prompt-length`),
    generated from it with this description as its help; the budget's fields are `--budget` and
    `--max-*`. A setting named between backquotes in a description is another field. Settings not
    given take their model family's defaults (`FAMILY_DEFAULTS`); giving `init_text` implies `init`
    instruction, `label_words` verbalizer auto, and `local_share` or `local_dim` local cobyla.
    """

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default=DEFAULT_MODEL, description=f"{MODEL_CHOICE}; or a local model directory or a .gguf "
                       "file (in process); with an endpoint, a model the server serves")
    method: Literal["bbt", "bbtv2", "prompt-tuning", "p-tuning", "prefix-tuning", "p-tuning-v2"] = Field(
        default="bbt",
        description="bbt: input prompt; bbtv2: deep prompt, layer by layer; prompt-tuning, p-tuning, prefix-tuning, "
        "p-tuning-v2: the gradient baselines through PEFT (in process only: they need the weights; `lr`, `epochs`, "
        "`batch_size`); asking for a second search stage (`local`) keeps bbt",
    )
    seed: int = Field(default=42, ge=0, description="picks the 16-shot split and p0 (the soft prompt the search "
                      "starts from), and seeds the search")
    search_seed: int | None = Field(
        default=None, ge=0,
        description="seeds the projections and CMA-ES apart from the split, so that prompts tuned on one split "
        "differ (ensembles); default: the split's `seed`",
    )
    prompt_length: int = Field(default=50, ge=1, description="soft-prompt tokens")
    intrinsic_dim: int = Field(default=500, ge=1, description="size of z, the small vector CMA-ES searches; the soft "
                               "prompt is p0 + A z, A a fixed random matrix")
    popsize: int = Field(
        default=20, ge=3,
        description="CMA-ES population (queries per generation); at least 3: with 2, pycma's two-point step-size rule "
        "(chosen for d >= 300) fails",
    )
    sigma: float = Field(default=1.0, gt=0, description="CMA-ES initial step size, in units of z")
    loss: LossKind = Field(default="ce", description="what CMA-ES minimises on train: ce cross-entropy, hinge a margin "
                           "loss (margin 2), perf minus accuracy")
    projection: Literal["normal", "uniform"] = Field(
        default="normal", description="how the random matrix A (z to prompt) is drawn: normal, std "
        "alpha*sigma_hat/(sqrt(d)*sigma); uniform, as PyTorch initialises a Linear layer"
    )
    init: Literal["zero", "vocab", "instruction", "demos"] = Field(
        default="zero",
        description="p0, where the search starts: zeros; embeddings of random vocabulary tokens (BBT); of an "
        "instruction (`init_text`, or the task's default); of training examples written out with the template "
        "(demonstrations); an `init_text` implies instruction",
    )
    init_text: str | None = Field(default=None, min_length=1, description="the instruction p0 is made from "
                                  "(implies `init` instruction)")
    verbalizer: Literal["manual", "auto"] = Field(
        default="auto",
        description="auto: several label words per class (sentence encoders: label texts), chosen on the training "
        "split, how many by accuracy on train examples left out of the choice and on dev (2 queries of the budget; an "
        "LM: 3); manual: the task's own, which the gradient methods keep unless told",
    )
    label_words: int | None = Field(
        default=None, ge=1, le=32, description="with `verbalizer` auto (which it implies): words per class (default: "
        "1, 2, 3, 5 or 8, the best on train examples left out of the choice and on dev)"
    )
    select: Literal["dev-metric", "dev-loss", "train-dev"] = Field(
        default="dev-metric",
        description="the prompt a run returns, among the bests on train: best on dev by the task's metric (ties: dev "
        "loss), by dev loss (smoother than the metric on 32 examples), or by the metric on train + dev together "
        "(ties: their loss)",
    )
    folds: Literal[1, 2] = Field(
        default=1,
        description="2: train and dev swap roles halfway through the query budget (the second half searches on dev "
        "from z = 0, the starting prompt p0, and checks on train); the better of the two by its score on the split "
        "it did not search on is returned",
    )
    local: Literal["none", "cobyla"] = Field(
        default="none",
        description="bbt: a second search stage, COBYLA (scipy) from CMA-ES's best point in the `local_dim` principal "
        "directions of its covariance, for the last `local_share` of the query budget; giving either turns it on",
    )
    local_share: float = Field(default=0.3, gt=0, lt=1, description="share of the query budget for the second stage")
    local_dim: int = Field(default=20, ge=1, description="directions the second stage searches")
    alpha: float = Field(default=1.0, gt=0, description="scale of a normal A")
    bound: float | None = Field(default=None, gt=0, description="keep each coordinate of z within plus or minus this "
                                "(default: unbounded)")
    diagonal: bool = Field(default=False, description="separable CMA-ES (a diagonal covariance), for a large "
                           "intrinsic dimension")
    encoding: Literal["intrinsic", "float32", "float16"] = Field(
        default="intrinsic", description="how candidates travel to the model: intrinsic sends z and A's seed (the "
        "server rebuilds the prompt: the smallest requests); float32/float16 send the prompts themselves"
    )
    rounds: int | None = Field(
        default=None, ge=1,
        description="stop after this many rounds of one generation per prompted layer (bbtv2: each layer once a "
        "round; bbt: one generation); default: when the budget ends",
    )
    patience: int | None = Field(
        default=None, ge=1,
        description="stop early after this many generations in a row without a better dev score (bbtv2: "
        "generations, not rounds); default: never",
    )
    lr: float | None = Field(default=None, gt=0, description="gradient methods: learning rate (default: the paper's)")
    epochs: int = Field(default=30, ge=1, description="gradient methods: passes over the training split")
    batch_size: int = Field(default=8, ge=1, description="gradient methods: examples per step")
    k_shot: int = Field(default=16, ge=1, description="examples per class when a split is sampled from a pool")
    skip_bad_rows: bool = Field(
        default=False,
        description="leave out data rows whose text (or text_pair) is missing, empty or too long, and say how many "
        "per file, instead of stopping at the first one (naming its file and line)",
    )
    budget: Budget = Field(default_factory=Budget)

    @model_validator(mode="before")
    @classmethod
    def _implied(cls, data):
        """A setting that only means something with another one given turns that one on, unless it was given."""
        if isinstance(data, dict):
            data = dict(data)
            for given, (other, value) in IMPLIES.items():
                if data.get(given) is not None:
                    data.setdefault(other, value)
        return data

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
