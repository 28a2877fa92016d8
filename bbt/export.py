"""Tuned prompts as files other tools read: the materialized prompt, a PEFT adapter, bbt's deep-prompt file.

A run keeps its prompt as z and projection seeds (prompt.json), which only a bbt server can turn
back into vectors (p0 needs the model's embeddings). So a run also writes the prompt as the model
received it, p0 + A z, in RUN/prompt.safetensors (tensor "prompts", shape [layers, L, H]): the
server returns it with the final test evaluation (`bbt.scoring.evaluate_materialized`).

`bbt export --format peft` writes a BBT prompt as a PEFT PROMPT_TUNING adapter (adapter_config.json,
adapter_model.safetensors with "prompt_embeddings" [L, H]). PEFT puts its virtual tokens before
every input token and bbt puts its prompt after the leading special tokens, so the two agree
exactly where a model puts none (SmolLM2, GPT-2 style causal LMs); elsewhere the export is refused.
A BBTv2 prompt is added to the hidden states entering every layer, which no PEFT method does:
`--format bbt` writes it as bbt's own file (prompts.safetensors and a versioned bbt_prompt.json).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from bbt import rundir
from bbt.errors import ConfigError

DEEP_PROMPT_FORMAT = "bbt-deep-prompt"
DEEP_PROMPT_VERSION = 1


def save_prompts(path: Path, prompts: np.ndarray, **meta: str | int | None) -> None:
    """[layers, L, H] float32 as a safetensors file, tensor "prompts", `meta` as its string metadata."""
    _save_tensors(path, {"prompts": np.ascontiguousarray(prompts, dtype=np.float32)},
                  {k: str(v) for k, v in meta.items() if v is not None})


def _save_tensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """A safetensors file written as any other file (mode 0666 less the umask; safetensors' own
    save_file makes it 0600, which other users and tools cannot read)."""
    from safetensors.numpy import save

    Path(path).write_bytes(save(tensors, metadata=metadata))


def load_prompts(run: str | Path) -> np.ndarray:
    """RUN/prompt.safetensors: [layers, L, H]."""
    from safetensors.numpy import load_file

    path = Path(run) / rundir.PROMPTS_FILE
    if not path.is_file():
        raise ConfigError(f"{path} is missing: the run was made before bbt wrote materialized prompts, or did not "
                          "finish; tune it again (or finish it with bbt tune --resume)")
    return load_file(str(path))["prompts"]


def _refuse_existing(out: Path, names: tuple[str, ...]) -> None:
    taken = [n for n in names if (out / n).exists()]
    if taken:
        raise ConfigError(f"{out} already holds {', '.join(taken)}: pick another --out (nothing was overwritten)")


def to_peft(run: str | Path, out: str | Path, base_model: str | None = None) -> Path:
    """Write a BBT run's prompt as a PEFT PROMPT_TUNING adapter in `out`; returns `out`."""
    artifact = rundir.load_artifact(run)
    if artifact.method != "bbt" or len(artifact.z) != 1:
        raise ConfigError(f"{run} is a {artifact.method} run: its prompt is added to the hidden states of every layer, "
                          "which no PEFT method does; export it with --format bbt (bbt's own deep-prompt file)")
    if artifact.prompt_position not in (0, None) or artifact.prompt_placement is None:
        raise ConfigError(
            f"{run}'s prompt sits after {artifact.prompt_position} leading special token(s) of {artifact.model!r} "
            "(or the run does not say where); PEFT puts virtual tokens before every input token, so the adapter "
            "would not reproduce bbt's scores. Only models without leading special tokens (e.g. smollm2) export to "
            "PEFT; --format bbt writes this prompt as bbt's own file (prompts.safetensors and bbt_prompt.json)")
    prompts = load_prompts(run)
    out = Path(out)
    _refuse_existing(out, ("adapter_config.json", "adapter_model.safetensors"))
    out.mkdir(parents=True, exist_ok=True)
    length, hidden = prompts.shape[1:]
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "num_virtual_tokens": int(length),
        "token_dim": int(hidden),
        "num_transformer_submodules": 1,
        "num_attention_heads": None,  # PEFT fills these from the base model's config when it loads the adapter
        "num_layers": None,
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "base_model_name_or_path": base_model or artifact.model,
        "revision": None,
        "inference_mode": True,
        "auto_mapping": None,
        "modules_to_save": None,
    }
    embeddings = np.ascontiguousarray(prompts[0], dtype=np.float32)  # (L, H)
    _save_tensors(out / "adapter_model.safetensors", {"prompt_embeddings": embeddings}, {"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    return out


def to_bbt(run: str | Path, out: str | Path) -> Path:
    """Write any run's prompt (BBT or BBTv2) as bbt's deep-prompt file in `out`; returns `out`."""
    artifact = rundir.load_artifact(run)
    prompts = load_prompts(run)
    out = Path(out)
    _refuse_existing(out, ("prompts.safetensors", "bbt_prompt.json"))
    out.mkdir(parents=True, exist_ok=True)
    save_prompts(out / "prompts.safetensors", prompts)
    (out / "bbt_prompt.json").write_text(json.dumps({
        "format": DEEP_PROMPT_FORMAT, "version": DEEP_PROMPT_VERSION, "method": artifact.method, "model": artifact.model,
        "layers": int(prompts.shape[0]), "prompt_length": int(prompts.shape[1]), "hidden_size": int(prompts.shape[2]),
        "prompt_placement": artifact.prompt_placement, "prompt_position": artifact.prompt_position,
        "how": "prompts[0] are the input embeddings of L prompt tokens inserted after prompt_position leading special "
               "tokens; prompts[l] (l >= 1) are added to the hidden states entering layer l at those L positions",
        "task": artifact.task.model_dump(),
    }, indent=2))
    return out
