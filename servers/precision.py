"""The precision a model runs in: float32, or bfloat16 where the hardware multiplies it faster.

A frozen model scored for a loss and a ranking of candidates does not need float32 everywhere.
In bfloat16 the weights and the states between layers take half the memory, and the matrix
products run on the CPU's or GPU's bfloat16 units (AVX-512 BF16 / AMX, tensor cores): on the
development machine 2.2x the float32 rate of a SmolLM2-sized product on 2 threads
(`matmul_speedup`), and about 2x the queries per second of SmolLM2 in `bbt tune`.
What bfloat16's 8-bit mantissa would spoil stays float32:

- every normalisation (LayerNorm, RMSNorm) computes in float32 and hands its result back in the
  stream's precision;
- attention's softmax: `scaled_dot_product_attention` accumulates bfloat16 in float32;
- the read-out: the final states are cast to float32 before the verbalizer rows, which are kept
  in float32 (the output embedding is kept whole in float32, untied from the input one);
- the loss and metrics are computed from float32 logits (`servers/service.py`, `bbt/metrics.py`).

`auto` picks bfloat16 only for a model family whose accuracy in bfloat16 was measured to hold
(`AUTO_FAMILIES`), on a CUDA GPU that supports it or a CPU whose bfloat16 products are at least
`AUTO_MIN_SPEEDUP` times as fast as float32's (timed on the spot); otherwise float32. Causal LMs
are in: SmolLM2 BBTv2 at 500 queries in bfloat16 ended 0.7 ± 0.6 points below float32 on SST-2
(5 seeds) and 0.4 ± 0.9 below on AG News (3 seeds), within the 1-point goal, at 2.0x the queries
per second (docs/results/2026-12-07-bfloat16.md). Sentence encoders are not: MiniLM's speed was
measured (1.8x), its accuracy over whole runs was not.
"""

from __future__ import annotations

import time
from functools import lru_cache

import torch

from bbt.errors import ConfigError

CHOICES = ("float32", "bfloat16", "auto")
AUTO_MIN_SPEEDUP = 1.5  # bfloat16 matmuls must be this much faster for `auto` to pick them on a CPU
AUTO_FAMILIES: tuple[str, ...] = ("causal",)  # families measured to keep their accuracy in bfloat16 (see above)


def resolve(spec: str | None, device: torch.device, family: str | None = None) -> str:
    """'float32' or 'bfloat16' for `spec` (float32, bfloat16, auto; None: float32) on `device`, for
    a model of `family` (auto: bfloat16 only for the families in AUTO_FAMILIES)."""
    if spec in (None, "", "float32", "fp32"):
        return "float32"
    if spec in ("bfloat16", "bf16"):
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"{torch.cuda.get_device_name(device)} has no bfloat16 support: use --dtype float32")
        return "bfloat16"
    if spec != "auto":
        raise ConfigError(f"unknown dtype {spec!r}: choose {', '.join(CHOICES)}")
    if family not in AUTO_FAMILIES:
        return "float32"
    if device.type == "cuda":
        return "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if device.type == "cpu":
        return "bfloat16" if matmul_speedup() >= AUTO_MIN_SPEEDUP else "float32"
    return "float32"  # MPS: not measured


@lru_cache(maxsize=1)
def matmul_speedup() -> float:
    """How many times faster a [640 x 576] @ [576 x 1536] product (one SmolLM2 feed-forward matmul
    of a 640-token pass) runs in bfloat16 than in float32 on this CPU with torch's current threads,
    best of 5 (about 0.1 s)."""
    a32, b32 = torch.randn(640, 576), torch.randn(576, 1536)

    def best(a: torch.Tensor, b: torch.Tensor) -> float:
        torch.mm(a, b)  # warm-up: the first call picks and packs the kernel
        times = []
        for _ in range(5):
            start = time.perf_counter()
            for _ in range(4):
                torch.mm(a, b)
            times.append(time.perf_counter() - start)
        return min(times)

    return best(a32, b32) / best(a32.bfloat16(), b32.bfloat16())


class Float32Norm(torch.nn.Module):
    """A normalisation computed in float32 on states of any precision; its output goes back to
    the input's precision, or stays float32 with `keep_float32` (the last one, before the read-out)."""

    def __init__(self, norm: torch.nn.Module, keep_float32: bool = False):
        super().__init__()
        self.norm, self.keep_float32 = norm.float(), keep_float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.norm(x.float())
        return out if self.keep_float32 else out.to(x.dtype)


def is_norm(module: torch.nn.Module) -> bool:
    name = type(module).__name__
    return isinstance(module, torch.nn.LayerNorm) or name.endswith("RMSNorm") or name.endswith("LayerNorm")


def to_bfloat16(model: torch.nn.Module) -> torch.nn.Module:
    """Cast a frozen transformers model to bfloat16 in place, but for what must stay float32 (see
    the module docstring): its norms and its output head. Returns the model."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if out is not None and out.weight is model.get_input_embeddings().weight:  # untie: the input side is cast
        out.weight = torch.nn.Parameter(out.weight.detach().clone(), requires_grad=False)
        model.config.tie_word_embeddings = False
    model.to(torch.bfloat16)
    for attr in ("cls", "lm_head"):  # a masked LM's head (transform, norm, decoder) or a causal LM's
        if isinstance(getattr(model, attr, None), torch.nn.Module):
            getattr(model, attr).float()
    base = getattr(model, "base_model", model)
    final = next((getattr(base, n) for n in ("norm", "ln_f", "final_layer_norm") if hasattr(base, n)), None)
    for parent in list(base.modules()):
        for name, child in list(parent.named_children()):
            if is_norm(child) and not isinstance(parent, Float32Norm):
                # the last norm before the read-out hands it float32 states
                setattr(parent, name, Float32Norm(child, keep_float32=child is final))
    return model


def dtype_of(model: torch.nn.Module) -> str:
    """'bfloat16' when the model's layers run in bfloat16, else 'float32'."""
    emb = model.get_input_embeddings()
    return "bfloat16" if emb.weight.dtype == torch.bfloat16 else "float32"
