"""The search loops: BBT (one input prompt) and BBTv2 (a prompt per layer, layer by layer).

Each generation: CMA-ES proposes `popsize` intrinsic vectors z, one request scores them all on the
training split (one query each), CMA-ES is told the losses. Whenever a generation beats the best
training loss so far, its winner is scored on the dev split (one more query); the prompt returned
is the best on dev. The ledger is checked before every request, so the budget is never crossed.
With `patience`, the run also ends after that many generations without a better dev score.

BBTv2 keeps one CMA-ES per layer. Generation g tunes layer g mod layers (bottom to top, round
after round) while every other layer keeps its best z so far: divide and conquer. A run ends when
the budget affords no more train queries, or after `rounds` rounds.

With two folds (TuneConfig.folds), train and dev swap roles halfway: the first half of the budget
searches on train and checks its bests on dev; the second starts again from z = 0 with fresh
CMA-ES, searches on dev and checks on train. A candidate is always judged on the split it was not
fitted to, so the two folds' prompts compete on held-out scores, and every k-shot input has
steered a search instead of half of them only ever choosing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from bbt import local_search, metrics, starts
from bbt.backends.base import Backend
from bbt.budget import Ledger
from bbt.config import TuneConfig
from bbt.data import Split
from bbt.errors import ConfigError
from bbt.optimizer import CMAES
from bbt.prompt import Prompt
from bbt.projection import normal_spec, uniform_spec
from bbt.protocol import EvaluateRequest, ModelInfo, ProjectionSpec, TaskSpec
from bbt.session import Session


def derive_seed(seed: int, *path: int) -> int:
    """Independent 32-bit seeds for each random stream of a run (projection of layer l, CMA-ES, ...)."""
    return int(np.random.SeedSequence([seed, *path]).generate_state(1)[0])


_PROJECTION, _CMA, _INIT = 1, 2, 3  # stream ids for derive_seed


@dataclass
class Evaluation:
    """One candidate's scores on one split."""

    loss: float
    metric: float  # accuracy or F1, by the task
    accuracy: float
    # metrics.above_chance of its cross-entropy; kept for held-out scores
    above_chance: float | None = None

    @classmethod
    def of(cls, logits: np.ndarray, labels, metric: str, loss: str = "ce") -> Evaluation:
        """The scores of one candidate's logits [N, C] against labels [N]."""
        lg, y = np.asarray(logits)[None], np.asarray(labels)
        return cls(loss=float(metrics.loss(loss, lg, y)[0]), metric=float(metrics.score(metric, lg, y)[0]),
                   accuracy=float(metrics.accuracy(lg, y)[0]))


@dataclass
class TuneResult:
    prompt: Prompt
    train: Evaluation
    dev: Evaluation | None
    generations: int
    seconds: float
    stop_reason: str
    history: list[dict] = field(default_factory=list)
    path: list[tuple[int, np.ndarray]] = field(default_factory=list)  # TuneState.path
    fold: int | None = None  # two folds: the one the prompt came from (0: fitted to train, 1: to dev)
    # metrics.above_chance of the returned prompt on the split it was checked on (dev; train if fold 1)
    above_chance: float | None = None


class Scorer:
    """Sends populations for one split through `session` and books what they cost."""

    def __init__(self, session: Session, cfg: TuneConfig, task: TaskSpec, split: Split, *, tuning: bool = True):
        self.session, self.cfg, self.task, self.split, self.tuning = session, cfg, task, split, tuning
        stats = session.stats(task, split)
        self.hidden_std = stats.hidden_std
        self.n = len(split)
        self.tokens = stats.tokens  # per example, template included, prompt excluded
        self.tokens_per_query = sum(stats.tokens) + self.n * cfg.prompt_length

    def affordable(self, k: int) -> int:
        return self.session.affordable(k, examples=self.n, tokens=self.tokens_per_query) if self.tuning else k

    def score(self, prompt: Prompt, z: np.ndarray, layer: int | None = None) -> tuple[np.ndarray, ...]:
        """Losses, metric, accuracy and logits [K, N, C] per candidate for z [K, layers, d] that
        differ from `layer` up."""
        k = z.shape[0]
        req = EvaluateRequest(
            model=self.cfg.model, task=self.task, inputs=self.split.examples, labels=self.split.labels,
            loss=self.cfg.loss, return_logits=True,
            candidates=prompt.candidates(z, self.cfg.encoding, layer=layer if k > 1 and layer else None),
        )
        resp = self.session.query(req, tuning=self.tuning, queries=k, examples=k * self.n,
                                  tokens=k * self.tokens_per_query)
        logits = resp.logits.to_numpy()
        labels = np.asarray(self.split.labels)
        return (np.asarray(resp.losses), metrics.score(self.task.metric, logits, labels), metrics.accuracy(logits, labels),
                logits)


def _second_stage(s: TuneState, cfg: TuneConfig, prompt: Prompt, scorer: Scorer, check_dev, finish) -> str:
    """COBYLA from the best z on train, in the principal subspace of CMA-ES (bbt.local_search),
    one candidate per query; every `popsize` queries are booked as one generation, with the dev
    check of a new best on train. Returns the stop reason ("budget" or "converged")."""
    if s.local_base is None:
        s.local_base = s.best_z.copy()
    basis = local_search.subspace(s.optimizers[0], cfg.local_dim)  # CMA-ES is not told in this stage: same basis on resume
    window: list[tuple[float, float, float]] = []  # (loss, metric, accuracy) since the last booked generation
    improved: list[np.ndarray] = []

    def objective(x: np.ndarray) -> float:
        if scorer.affordable(1) == 0:
            raise local_search.Stop
        z = s.local_base.copy()
        z[0] += basis @ x
        losses, scores, accs, _ = scorer.score(prompt, z[None])
        window.append((float(losses[0]), float(scores[0]), float(accs[0])))
        if losses[0] < s.best_train.loss:
            s.best_train, s.best_z = Evaluation(*window[-1]), z
            improved[:] = [z]
        return float(losses[0])

    def book() -> None:
        if not window:
            return
        losses = [w[0] for w in window]
        i = int(np.argmin(losses))
        record = {"generation": s.generation, "layer": 0, "stage": "local", "candidates": len(window),
                  "loss_mean": float(np.mean(losses)), "loss_min": losses[i], "train_acc": window[i][2]}
        if improved:
            check_dev(improved.pop(), record)
        window.clear()
        finish(record)

    def after() -> None:
        if len(window) == cfg.popsize:
            book()

    reason = local_search.cobyla(objective, basis.shape[1], s.local_losses, max_evals=cfg.budget.queries, after=after)
    book()
    return reason


def _selection_key(dev: Evaluation, train: Evaluation, select: str) -> tuple[float, ...]:
    """Lower is better: how `TuneConfig.select` ranks a candidate by its dev and train scores."""
    if select == "dev-loss":
        return (dev.loss,)
    if select == "train-dev":  # train and dev are the same size in a k-shot split: the mean is the pooled score
        return (-(dev.metric + train.metric), dev.loss + train.loss)
    return (-dev.metric, dev.loss)


def _better(a: tuple[Evaluation, Evaluation], b: tuple[Evaluation, Evaluation], select: str) -> bool:
    """Whether candidate `a` (dev, train scores) beats `b` under the run's selection rule; ties keep `b`."""
    return _selection_key(*a, select) < _selection_key(*b, select)


def _last_dev_gain(history: list[dict]) -> int:
    """Generations completed when the dev score last improved (0: never)."""
    return max((h["generation"] + 1 for h in history if h.get("new_best_dev")), default=0)


def make_projections(cfg: TuneConfig, info: ModelInfo, layers: int, hidden_std: list[float]) -> list[ProjectionSpec]:
    """One projection per prompted layer, each from its own derived seed."""
    D = cfg.prompt_length * info.hidden_size
    specs = []
    for layer in range(layers):
        seed = derive_seed(cfg.search, _PROJECTION, layer)
        if cfg.projection == "uniform":
            specs.append(uniform_spec(seed=seed, d=cfg.intrinsic_dim, D=D))
        else:
            target = info.embedding_std if layer == 0 else hidden_std[layer]
            specs.append(normal_spec(seed=seed, d=cfg.intrinsic_dim, D=D, target_std=target, alpha=cfg.alpha, sigma=cfg.sigma))
    return specs


@dataclass
class TuneState:
    """Everything a search carries from one generation to the next: what a checkpoint saves."""

    prompt: Prompt  # its z: the best on dev so far (the best on train until dev has scored one)
    optimizers: list[CMAES]  # one per prompted layer
    best_z: np.ndarray  # best on train: the base the next generation builds on (BBTv2)
    best_train: Evaluation = field(default_factory=lambda: Evaluation(float("inf"), 0.0, 0.0))
    best_dev: Evaluation | None = None
    chosen_train: Evaluation | None = None  # train scores of the prompt picked on dev
    generation: int = 0
    seconds: float = 0.0  # tuning time so far, over every session of a resumed run
    ledger_step: int = 0  # the ledger's step after the last complete generation
    history: list[dict] = field(default_factory=list)
    # (queries used, z) each time the prompt to return changed: the prompt a smaller budget would have returned
    path: list[tuple[int, np.ndarray]] = field(default_factory=list)
    stage: str = "cma"  # "local": the second stage (TuneConfig.local) has begun
    local_base: np.ndarray | None = None  # z where the second stage started (best on train then)
    local_losses: list[float] = field(default_factory=list)  # every train loss it paid for, in order
    # two folds (TuneConfig.folds): 1 once the search fits dev and checks on train; generation where it began;
    # the fold the prompt to return came from
    fold: int = 0
    fold_start: int = 0
    chosen_fold: int = 0
    # why the search ended, once it has: a finished search answers from its state alone, so the
    # checkpoint a finished run keeps holds no CMA-ES (BBTv2 on SmolLM2: 0.4 MB, not 123 MB)
    stop_reason: str | None = None


def start_state(cfg: TuneConfig, info: ModelInfo, hidden_std: list[float], init_text: str | None = None) -> TuneState:
    """A search at generation 0: z = 0 at every prompted layer, fresh CMA-ES, projections from the seed.

    `hidden_std` is the std of each layer's hidden states on the training inputs (`Backend.stats`);
    `init_text` the text of p0 (`bbt.starts.init_text`) when cfg.init is "instruction" or "demos".
    """
    if cfg.prompt_length > info.max_prompt_tokens:
        raise ConfigError(f"prompt length {cfg.prompt_length} is over model {cfg.model!r}'s limit of {info.max_prompt_tokens} tokens")
    layers = 1 if cfg.method == "bbt" else info.num_layers
    prompt = Prompt(
        z=np.zeros((layers, cfg.intrinsic_dim)),
        projections=make_projections(cfg, info, layers, hidden_std),
        prompt_length=cfg.prompt_length,
        init_seed=derive_seed(cfg.seed, _INIT) if cfg.init == "vocab" else None,
        init_text=init_text,
    )
    optimizers = [
        CMAES(cfg.intrinsic_dim, popsize=cfg.popsize, sigma=cfg.sigma, seed=derive_seed(cfg.search, _CMA, layer),
              bound=cfg.bound, diagonal=cfg.diagonal)
        for layer in range(layers)
    ]
    return TuneState(prompt=prompt, optimizers=optimizers, best_z=prompt.z.copy())


def tune(backend: Backend, cfg: TuneConfig, task: TaskSpec, train: Split, dev: Split, ledger: Ledger,
         on_generation: Callable[[dict], None] | None = None, *, state: TuneState | None = None,
         on_state: Callable[[TuneState], None] | None = None) -> TuneResult:
    """Search a prompt with CMA-ES within the ledger's budget; the best on dev is returned.

    `on_generation` gets one dict per generation (what log.jsonl records); `on_state` then gets
    the state after each complete generation (what a checkpoint saves). Given a `state` saved
    that way (and a ledger rewound to its `ledger_step`), the search continues exactly where it
    was: the same seed gives the same result whether or not the run was interrupted.
    """
    return search(Session(backend, cfg.model, ledger), cfg, task, train, dev, on_generation, state=state,
                  on_state=on_state)


def search(session: Session, cfg: TuneConfig, task: TaskSpec, train: Split, dev: Split,
           on_generation: Callable[[dict], None] | None = None, *, state: TuneState | None = None,
           on_state: Callable[[TuneState], None] | None = None) -> TuneResult:
    """`tune` through a run's session: its queries booked on the session's ledger."""
    ledger = session.ledger
    train_scorer = Scorer(session, cfg, task, train)
    dev_scorer = Scorer(session, cfg, task, dev)
    if state is None:
        text = starts.init_text(cfg.init, task, cfg.init_text, train, train_scorer.tokens, cfg.prompt_length,
                                derive_seed(cfg.seed, _INIT))
        state = start_state(cfg, session.info, train_scorer.hidden_std, text)
    s = state
    half = None if cfg.folds == 1 else cfg.budget.queries // 2  # queries of the first fold (TuneConfig.folds)
    if s.stop_reason is not None:  # a finished search (a finished run's checkpoint): its result, no query
        return _result(s, s.seconds, s.stop_reason, two_folds=half is not None)
    prompt, layers = s.prompt, len(s.optimizers)
    start = time.perf_counter() - s.seconds
    stop_reason = "budget"
    max_generations = None if cfg.rounds is None else cfg.rounds * layers
    # the second stage takes the last local_share of the query budget (TuneConfig.local)
    first_stage = None if cfg.local == "none" else cfg.budget.queries - round(cfg.local_share * cfg.budget.queries)

    def finish(record: dict) -> None:
        """Book a completed generation (or second-stage window): state, path, log and checkpoint."""
        if s.best_dev is None:  # nothing scored on dev yet: fall back to the best on train
            s.chosen_train, prompt.z = s.best_train, s.best_z.copy()
        s.generation += 1
        s.seconds = time.perf_counter() - start
        s.ledger_step = ledger.step
        if not s.path or not np.array_equal(s.path[-1][1], prompt.z):
            s.path.append((ledger.tuning.queries, prompt.z.copy()))
        record.update(
            best_train_loss=s.best_train.loss, best_train_acc=s.best_train.accuracy,
            best_dev_metric=None if s.best_dev is None else s.best_dev.metric,
            queries_used=ledger.tuning.queries, seconds=round(s.seconds, 3),
        )
        s.history.append(record)
        if on_generation is not None:
            on_generation(record)
        if on_state is not None:
            on_state(s)

    def check_dev(z: np.ndarray, record: dict) -> None:
        """Score a new best-on-train z [layers, d] on dev (one query) and keep it if it is better there.
        In the second fold "train" is the dev split and "dev" the train split (log keys stay)."""
        held_out = dev_scorer if s.fold == 0 else train_scorer
        if held_out.affordable(1):
            d_loss, d_score, d_acc, d_logits = held_out.score(prompt, z[None])
            chance = float(metrics.above_chance(d_logits, np.asarray(held_out.split.labels))[0])
            candidate = Evaluation(float(d_loss[0]), float(d_score[0]), float(d_acc[0]), above_chance=chance)
            record.update(dev_loss=candidate.loss, dev_metric=candidate.metric)
            if s.best_dev is None or _better((candidate, s.best_train), (s.best_dev, s.chosen_train), cfg.select):
                s.best_dev, s.chosen_train, prompt.z, s.chosen_fold = candidate, s.best_train, z.copy(), s.fold
                record["new_best_dev"] = True

    def next_fold() -> None:
        """Start the second fold: z = 0, fresh CMA-ES on their own seeds; the prompt to return stays."""
        s.fold, s.fold_start = 1, s.generation
        s.optimizers = [CMAES(cfg.intrinsic_dim, popsize=cfg.popsize, sigma=cfg.sigma,
                              seed=derive_seed(cfg.search, _CMA, layer, 1), bound=cfg.bound, diagonal=cfg.diagonal)
                        for layer in range(layers)]
        s.best_z, s.best_train = np.zeros_like(s.best_z), Evaluation(float("inf"), 0.0, 0.0)

    while s.stage == "cma":
        if s.history and s.history[-1]["candidates"] < cfg.popsize:
            break  # the last generation was cut to what the budget had left
        in_fold = s.generation - s.fold_start  # rounds and patience count within a fold
        ended = None
        if in_fold == max_generations:
            ended = "rounds"
        elif cfg.patience is not None and s.generation - max(_last_dev_gain(s.history), s.fold_start) >= cfg.patience:
            ended = "patience"
        elif s.fold == 0 and half is not None and ledger.tuning.queries + cfg.popsize > half:
            ended = "fold"
        if ended is not None and s.fold == 0 and half is not None:
            next_fold()
            continue
        if ended is not None:
            stop_reason = ended
            break
        if first_stage is not None and ledger.tuning.queries + cfg.popsize > first_stage:
            s.stage = "local"
            break
        fit = train_scorer if s.fold == 0 else dev_scorer
        k = fit.affordable(cfg.popsize)
        if k == 0:
            break
        layer = in_fold % layers
        es = s.optimizers[layer]
        proposals = es.ask()  # (popsize, d)
        z = np.repeat(s.best_z[None], k, axis=0)  # (K, layers, d)
        z[:, layer] = proposals[:k]
        losses, scores, accs, _ = fit.score(prompt, z, layer)
        if k == cfg.popsize:
            es.tell(proposals, losses)  # a cut final generation is scored but not told: pycma needs all of it
        i = int(np.argmin(losses))
        record = {
            "generation": s.generation, "layer": layer, "candidates": k,
            "loss_mean": float(losses.mean()), "loss_min": float(losses[i]), "train_acc": float(accs[i]),
        }
        if half is not None:
            record["fold"] = s.fold
        if losses[i] < s.best_train.loss:
            s.best_train = Evaluation(float(losses[i]), float(scores[i]), float(accs[i]))
            s.best_z = z[i].copy()
            check_dev(z[i], record)
        finish(record)
    if s.stage == "local":
        stop_reason = _second_stage(s, cfg, prompt, train_scorer, check_dev, finish)
    s.stop_reason = stop_reason
    return _result(s, time.perf_counter() - start, stop_reason, two_folds=half is not None)


def _result(s: TuneState, seconds: float, stop_reason: str, *, two_folds: bool) -> TuneResult:
    """What a search returns from its state: the prompt picked on dev, with its scores."""
    fitted, held_out = s.chosen_train or s.best_train, s.best_dev
    if s.chosen_fold == 1:  # fitted to dev, checked on train: report each score under its split
        fitted, held_out = held_out, fitted
    return TuneResult(
        prompt=s.prompt, train=fitted, dev=held_out, generations=s.generation,
        fold=s.chosen_fold if two_folds else None, seconds=seconds, stop_reason=stop_reason, history=s.history,
        path=s.path, above_chance=None if s.best_dev is None else s.best_dev.above_chance,
    )
