"""The gradient methods black-box tuning replaces, through HF PEFT, on bbt's frozen model and read-out.

Prompt Tuning (Lester et al., 2021), P-Tuning (Liu et al., 2021, a prompt encoder), Prefix-Tuning
(Li and Liang, 2021, an MLP-reparameterized prefix at every layer) and P-Tuning v2 (Liu et al.,
2022, a prefix at every layer without reparameterization) wrap the same model a bbt server
scores, and are trained with the same template, verbalizer or label texts, read-out head and
cross-entropy loss as a BBT run; the state best on dev is kept, as BBT keeps its best prompt.

PEFT puts its virtual tokens before every input token (prompt methods) or in the keys and values
of every layer (prefix methods); the class is read where bbt reads it, shifted past the virtual
tokens. Shapes: B examples in a batch, T tokens, V virtual tokens, C classes.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from bbt.data import Split
from bbt.errors import ConfigError
from bbt.protocol import Example, TaskSpec
from servers.engine import PromptModel
from servers.families import class_scores

if TYPE_CHECKING:
    from bbt.config import TuneConfig

# method -> (optimizer, learning rate, where the default comes from)
DEFAULTS: dict[str, tuple[str, float, str]] = {
    "prompt-tuning": ("adafactor", 0.3, "Lester et al. 2021: Adafactor, learning rate 0.3"),
    "p-tuning": ("adam", 1e-5, "Liu et al. 2021 (GPT Understands, Too): Adam, learning rate 1e-5"),
    "prefix-tuning": ("adamw", 5e-5, "Li and Liang 2021: AdamW, learning rate 5e-5, MLP reparameterization"),
    "p-tuning-v2": ("adamw", 1e-2, "Liu et al. 2022: AdamW, learning rate 5e-3 to 1e-2 (1e-2 here), no reparameterization"),
}
PREFIX_METHODS = ("prefix-tuning", "p-tuning-v2")
# epochs without a better dev score before a gradient run stops, unless told: TuneConfig's patience None
# means never for a search, whose generations are cheap, but an epoch is a pass over the data
GRADIENT_PATIENCE = 10


@dataclass(frozen=True)
class Recipe:
    """How a gradient method is trained (`train`): everything but the model, task and data."""

    method: str  # a key of DEFAULTS
    length: int  # virtual tokens
    seed: int  # PEFT's initialisation and the order of the training examples
    lr: float | None = None  # None: the method's paper's (DEFAULTS)
    epochs: int = 30  # passes over the training split, at most
    batch_size: int = 8  # examples per optimizer step
    patience: int | None = GRADIENT_PATIENCE  # epochs without a better dev score before stopping; None: never

    @classmethod
    def of(cls, cfg: TuneConfig) -> Recipe:
        """The recipe of a gradient run configured by `cfg`: its prompt length, its search seed, its
        training settings, and GRADIENT_PATIENCE where it gives no patience."""
        return cls(method=cfg.method, length=cfg.prompt_length, seed=cfg.search, lr=cfg.lr, epochs=cfg.epochs,
                   batch_size=cfg.batch_size, patience=GRADIENT_PATIENCE if cfg.patience is None else cfg.patience)

    @property
    def optimizer(self) -> str:
        return DEFAULTS[self.method][0]

    @property
    def learning_rate(self) -> float:
        """The learning rate training uses: the one given, else the method's default."""
        return DEFAULTS[self.method][1] if self.lr is None else self.lr

    @property
    def lr_source(self) -> str:
        """Where `learning_rate` comes from, for a log line: "given", or the paper behind the default."""
        return "given" if self.lr is not None else DEFAULTS[self.method][2]


@dataclass
class Scores:
    loss: float
    metric: float
    accuracy: float


@dataclass
class GradientResult:
    """A trained method: its PEFT model (the state best on dev loaded), scores and what it cost."""

    peft_model: torch.nn.Module
    train: Scores
    dev: Scores
    epochs: int
    best_epoch: int
    forward_passes: int  # batches run forward (training, dev and train scoring)
    backward_passes: int  # batches run backward
    examples_seen: int  # training examples fed to a backward pass
    trainable_parameters: int
    seconds: float
    stop_reason: str
    history: list[dict] = field(default_factory=list)


def peft_config(method: str, family: str, length: int, hidden: int):
    """The PEFT config of a method for a model family."""
    try:
        import peft
    except ImportError:
        raise ConfigError("the gradient baselines need PEFT: pip install 'bbt[peft]'") from None
    task_type = "CAUSAL_LM" if family == "causal" else "FEATURE_EXTRACTION"
    if method == "prompt-tuning":
        # sampled vocabulary embeddings: Lester et al.'s better initialisation, and bbt's --init vocab
        return peft.PromptTuningConfig(task_type=task_type, num_virtual_tokens=length, prompt_tuning_init="SAMPLE_VOCAB")
    if method == "p-tuning":
        return peft.PromptEncoderConfig(task_type=task_type, num_virtual_tokens=length, encoder_hidden_size=hidden)
    if method == "prefix-tuning":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=length, prefix_projection=True,
                                       encoder_hidden_size=512)
    if method == "p-tuning-v2":
        return peft.PrefixTuningConfig(task_type=task_type, num_virtual_tokens=length, prefix_projection=False)
    raise ConfigError(f"unknown gradient method {method!r}: choose {', '.join(DEFAULTS)}")


def check(pm: PromptModel, method: str, length: int) -> None:
    """Refuse, before anything is written, a method this model cannot run or a prompt over its limit."""
    if length > pm.max_prompt_tokens:
        raise ConfigError(f"prompt length {length} is over model {pm.name!r}'s limit of {pm.max_prompt_tokens} tokens")
    peft_config(method, pm.family.name, length, pm.hidden_size)


def _optimizer(name: str, params, lr: float):
    if name == "adafactor":
        return torch.optim.Adafactor(params, lr=lr, weight_decay=1e-5)
    if name == "adam":
        return torch.optim.Adam(params, lr=lr)
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.01)


def class_logits(pm: PromptModel, peft_model, task: TaskSpec, examples: list[Example], method: str) -> torch.Tensor:
    """(B, C) class scores of a PEFT-wrapped model, read by bbt's head of the model's family."""
    enc = pm.encode(task, examples)
    ids, mask = pm.batch(enc, list(range(len(examples))), 0)  # (B, T), no bbt prompt slots
    readout = torch.tensor(enc.readout, device=pm.device)
    shift = 0 if method in PREFIX_METHODS else peft_model.peft_config["default"].num_virtual_tokens
    out = peft_model(input_ids=ids, attention_mask=mask)
    rows = torch.arange(len(examples), device=pm.device)
    if pm.family.name == "encoder":
        hidden = out.last_hidden_state  # (B, V + T, H): PEFT's virtual tokens first
        full = torch.cat([torch.ones(len(examples), shift, dtype=mask.dtype, device=mask.device), mask], dim=1)
        return pm.family.head(task)(hidden, full, readout + shift, 0, shift)
    ids, classes = pm.family.verbalizer_ids(task)
    words = out.logits[rows, readout + shift][:, torch.tensor(ids, device=pm.device)]  # (B, W) at the read position
    return class_scores(words, classes, len(task.labels))  # (B, C)


def _scores(logits: torch.Tensor, labels: torch.Tensor, metric: str) -> Scores:
    from bbt import metrics

    lg, y = logits.detach().cpu().numpy()[None], labels.cpu().numpy()
    return Scores(loss=float(F.cross_entropy(logits, labels)), metric=float(metrics.score(metric, lg, y)[0]),
                  accuracy=float(metrics.accuracy(lg, y)[0]))


def predict_logits(pm: PromptModel, peft_model, task: TaskSpec, examples: list[Example], method: str,
                   batch_size: int = 32) -> np.ndarray:
    """(N, C) class scores of a trained PEFT model, in batches, without gradients."""
    peft_model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            out.append(class_logits(pm, peft_model, task, examples[i : i + batch_size], method).float().cpu())
    return torch.cat(out).numpy()


def train(pm: PromptModel, task: TaskSpec, train_split: Split, dev_split: Split, recipe: Recipe, *,
          on_epoch: Callable[[dict], None] | None = None) -> GradientResult:
    """Train `recipe.method` on the frozen model; the state best on dev (metric, then loss) is kept.

    One epoch is one shuffled pass over `train_split` in batches of `recipe.batch_size` examples,
    then one scoring of `dev_split`; training stops after `recipe.epochs` epochs, or after
    `recipe.patience` epochs without a better dev score. `on_epoch` gets each epoch's record (the
    entries of `GradientResult.history`) as soon as it is scored.
    """
    from peft import get_peft_model

    method, batch_size, patience = recipe.method, recipe.batch_size, recipe.patience
    train_ex, dev_ex = train_split.examples, dev_split.examples
    check(pm, method, recipe.length)
    torch.manual_seed(recipe.seed)
    rng = np.random.default_rng(recipe.seed)
    base = copy.copy(pm.model)  # PEFT rebinds a few attributes of the model it wraps: not on the shared one
    peft_model = get_peft_model(base, peft_config(method, pm.family.name, recipe.length, pm.hidden_size))
    params = [p for p in peft_model.parameters() if p.requires_grad]
    n_params = sum(p.numel() for p in params)
    opt = _optimizer(recipe.optimizer, params, recipe.learning_rate)
    y_train = torch.tensor(train_split.labels, device=pm.device)
    y_dev = torch.tensor(dev_split.labels, device=pm.device)
    forward = backward = seen = 0
    best: tuple | None = None
    best_state, best_epoch, history = None, 0, []
    start = time.perf_counter()
    stop_reason = "epochs"
    epoch = 0
    with pm.lock, torch.inference_mode(False):
        for epoch in range(1, recipe.epochs + 1):
            peft_model.train()
            order = rng.permutation(len(train_ex))
            losses = []
            for i in range(0, len(order), batch_size):
                idx = order[i : i + batch_size]
                try:
                    logits = class_logits(pm, peft_model, task, [train_ex[j] for j in idx], method)
                except (TypeError, ValueError, AttributeError) as exc:  # e.g. a model that takes no past key values
                    raise ConfigError(f"{method} cannot run on {pm.name!r} ({type(pm.model).__name__}) through PEFT: "
                                      f"{exc}") from exc
                loss = F.cross_entropy(logits, y_train[idx])
                if not torch.isfinite(loss):
                    raise ConfigError(f"{method}: the training loss became {float(loss)} at epoch {epoch}; "
                                      f"lower the learning rate (now {recipe.learning_rate})")
                opt.zero_grad()
                loss.backward()
                opt.step()
                forward, backward, seen = forward + 1, backward + 1, seen + len(idx)
                losses.append(loss.item())
            dev_logits = torch.from_numpy(predict_logits(pm, peft_model, task, dev_ex, method))
            forward += math.ceil(len(dev_ex) / 32)
            dev = _scores(dev_logits, y_dev.cpu(), task.metric)
            record = {"epoch": epoch, "train_loss": float(np.mean(losses)), "dev_loss": dev.loss, "dev_metric": dev.metric,
                      "seconds": round(time.perf_counter() - start, 3)}
            if best is None or (dev.metric, -dev.loss) > best:
                best, best_epoch = (dev.metric, -dev.loss), epoch
                best_state = [p.detach().clone() for p in params]
                record["new_best_dev"] = True
            history.append(record)
            if on_epoch is not None:
                on_epoch(record)
            if patience is not None and epoch - best_epoch >= patience:
                stop_reason = "patience"
                break
        with torch.no_grad():
            for p, kept in zip(params, best_state):
                p.copy_(kept)
        train_logits = torch.from_numpy(predict_logits(pm, peft_model, task, train_ex, method))
        dev_logits = torch.from_numpy(predict_logits(pm, peft_model, task, dev_ex, method))
        forward += math.ceil(len(train_ex) / 32) + math.ceil(len(dev_ex) / 32)
    return GradientResult(
        peft_model=peft_model, train=_scores(train_logits, y_train.cpu(), task.metric),
        dev=_scores(dev_logits, y_dev.cpu(), task.metric), epochs=epoch, best_epoch=best_epoch,
        forward_passes=forward, backward_passes=backward, examples_seen=seen, trainable_parameters=n_params,
        seconds=time.perf_counter() - start, stop_reason=stop_reason, history=history,
    )


def _check_adapter(pm: PromptModel, folder: Path, method: str) -> None:
    """Refuse an adapter made for another method or another model before PEFT reads it: PEFT itself
    would load a prefix of the wrong depth or width into a model and fail (or not) far from the cause."""
    try:
        config = json.loads((folder / "adapter_config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{folder} holds no readable PEFT adapter config ({exc}); "
                          "the run folder is damaged: train the method again into a new --out") from None
    found = {"peft_type": config.get("peft_type"), "token_dim": config.get("token_dim"),
             "num_layers": config.get("num_layers")}
    peft_type = peft_config(method, pm.family.name, 1, pm.hidden_size).peft_type.value  # what training writes
    expected = {"peft_type": peft_type, "token_dim": pm.hidden_size, "num_layers": pm.num_layers}
    wrong = [f"{k} {found[k]} (model {pm.name!r} with {method}: {expected[k]})"
             for k in expected if found[k] is not None and found[k] != expected[k]]
    if wrong:
        raise ConfigError(f"the adapter in {folder} was not made for this model and method: {'; '.join(wrong)}. "
                          f"Score it with the model it was trained on (its run's config.json names it)")


def load(pm: PromptModel, folder: str, method: str):
    """A trained method back from its adapter folder (RUN/adapter), on a copy of the model's wrapper."""
    try:
        from peft import PeftModel
    except ImportError:
        raise ConfigError("scoring a gradient baseline needs PEFT: pip install 'bbt[peft]'") from None
    if method not in DEFAULTS:
        raise ConfigError(f"unknown gradient method {method!r}: choose {', '.join(DEFAULTS)}")
    _check_adapter(pm, Path(folder), method)
    from safetensors import SafetensorError

    try:
        return PeftModel.from_pretrained(copy.copy(pm.model), folder).eval()
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as exc:
        raise ConfigError(f"PEFT cannot read the adapter in {folder} onto {pm.name!r}: {exc}") from None
