"""How K candidates x N examples are cut into forward passes, and put back together.

Every pass pads only to its own longest row: rows are sorted by length and cut into passes of
at most `TOKENS_PER_CHUNK` padded tokens (`ACCELERATOR_TOKENS_PER_CHUNK` off the CPU).
"""

from __future__ import annotations

import torch

# Padded tokens per forward pass. Small enough that a layer's activations (2048 x 4H floats, 12 MB
# for MiniLM) stay in cache and in reused heap memory: on a 2-core CPU bbt tuned 1.5x faster than
# with 16384 (experiments/bench_speed.py, its ablation). Large enough for full GEMMs.
TOKENS_PER_CHUNK = 2048
# On a GPU, passes that small would leave it waiting on kernel launches. Not yet measured (no GPU
# on the development machine): 32768 padded tokens keep MiniLM's largest activation (T x 4H floats)
# at 200 MB and a 24-layer, H = 1024 model's at 512 MB.
ACCELERATOR_TOKENS_PER_CHUNK = 32768


def chunks(items: list, lengths: list[int], tokens: int | None = None) -> list[list]:
    """Consecutive runs of `items` (sorted by ascending `lengths`) whose padded size, rows x the
    run's longest, stays within `tokens` (default TOKENS_PER_CHUNK); a longer item goes alone."""
    tokens = TOKENS_PER_CHUNK if tokens is None else tokens
    out: list[list] = []
    for item, n in zip(items, lengths):
        if out and (len(out[-1]) + 1) * n <= tokens:
            out[-1].append(item)
        else:
            out.append([item])
    return out


def scatter_rows(parts: list[torch.Tensor], rows: list[int], k: int, n: int) -> torch.Tensor:
    """(K, N, C) from per-pass logits (B, C) whose rows are flat indices cand * N + example.
    Out of place, so that autograd can follow it."""
    flat = torch.cat(parts)
    order = torch.empty(len(rows), dtype=torch.long, device=flat.device)
    order[torch.tensor(rows, device=flat.device)] = torch.arange(len(rows), device=flat.device)
    return flat[order].reshape(k, n, -1)
