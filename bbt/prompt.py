"""A prompt as the client knows it: z per prompted layer and the seeded projections that map it
(p = p0 + A z, p0 added by the model side), and its wire forms."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from bbt.projection import project
from bbt.protocol import IntrinsicPrompts, ProjectionSpec, PromptTensor, Tensor


@dataclass
class Prompt:
    """A tuned prompt: z per prompted layer and the projections that map it (p = A z)."""

    z: np.ndarray  # (layers, d)
    projections: list[ProjectionSpec]
    prompt_length: int
    init_seed: int | None = None  # p0 = embeddings of vocabulary tokens the server draws with this seed
    init_text: str | None = None  # p0 = embeddings of this text's tokens (an instruction, demonstrations)

    def untuned(self) -> Prompt:
        """The search's starting point, z = 0 (p = p0): the "zero prompt" the metrics compare against."""
        return replace(self, z=np.zeros_like(self.z))

    def candidates(self, z: np.ndarray | None = None, encoding: str = "intrinsic",
                   layer: int | None = None) -> IntrinsicPrompts | PromptTensor:
        """Wire form of a population z [K, layers, d] (default: this prompt alone, K=1); `layer`:
        the lowest layer in which the candidates differ (BBTv2's tuned layer), for the server."""
        z = self.z[None] if z is None else z
        if encoding == "intrinsic":
            return IntrinsicPrompts(z=Tensor.from_numpy(z), projections=self.projections,
                                    prompt_length=self.prompt_length, init_seed=self.init_seed,
                                    init_text=self.init_text, layer=layer)
        return PromptTensor(prompts=Tensor.from_numpy(self.materialize(z), dtype=encoding),
                            init_seed=self.init_seed, init_text=self.init_text, layer=layer)

    def materialize(self, z: np.ndarray | None = None) -> np.ndarray:
        """A z for a population z [K, layers, d] (default: this prompt): [K, layers, L, H], p0 not added."""
        z = self.z[None] if z is None else z
        k, layers, _ = z.shape
        hidden = self.projections[0].D // self.prompt_length
        p = np.stack([project(z[:, l], self.projections[l]) for l in range(layers)], axis=1)  # (K, layers, D)
        return p.reshape(k, layers, self.prompt_length, hidden)
