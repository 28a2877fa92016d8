"""Settings of a tuning run, as one validated model (what config.json of a run folder holds)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from bbt.budget import Budget
from bbt.protocol import LossKind


class TuneConfig(BaseModel):
    """Everything that decides a tuning run. The same config and seed give the same run."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str = Field(default="minilm", description="model name or local path (the server's name with an endpoint)")
    method: Literal["bbt", "bbtv2"] = Field(default="bbt", description="bbt: input prompt; bbtv2: a prompt per layer")
    seed: int = Field(default=42, ge=0, description="seeds the data split, the projections and CMA-ES")
    prompt_length: int = Field(default=50, ge=1, description="L, soft-prompt tokens")
    intrinsic_dim: int = Field(default=500, ge=1, description="d, the dimension CMA-ES searches")
    popsize: int = Field(default=20, ge=2, description="candidates per generation (queries per request)")
    sigma: float = Field(default=1.0, gt=0, description="CMA-ES initial step size")
    loss: LossKind = Field(default="ce", description="ce, hinge (margin 2) or perf (negative accuracy)")
    projection: Literal["normal", "uniform"] = Field(
        default="normal", description="normal: std alpha*sigma_hat/(sqrt(d)*sigma); uniform: PyTorch Linear init"
    )
    init: Literal["vocab", "zero"] = Field(
        default="zero", description="p0: embeddings of random vocabulary tokens (as in BBT), or zeros"
    )
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
    k_shot: int = Field(default=16, ge=1, description="examples per class when a split is sampled from a pool")
    budget: Budget = Field(default_factory=Budget)
