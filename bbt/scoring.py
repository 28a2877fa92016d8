"""Scoring prompts on a whole split, as evaluation: the model's answers in requests of at most
EVAL_CHUNK inputs, each booked on the run's ledger (queries = candidates scored per request)."""

from __future__ import annotations

import contextlib

import numpy as np

from bbt.data import Split
from bbt.prompt import Prompt
from bbt.protocol import EvaluateRequest, TaskSpec
from bbt.session import Session
from bbt.tuner import Evaluation

EVAL_CHUNK = 500  # examples per evaluation request (servers cap N per request)


def evaluate_split(session: Session, task: TaskSpec, split: Split, prompt: Prompt | None, loss: str = "ce",
                   on_chunk=None) -> tuple[Evaluation, np.ndarray]:
    """Scores of one prompt (None: the model without a soft prompt) on a whole split; logits [N, C].

    Large splits go out in chunks of EVAL_CHUNK examples; spending is booked as evaluation on the
    session's ledger (`Session(backend, model)`, without one: booked nowhere).
    `on_chunk(n)` is called with each chunk's number of examples once it is scored (a progress bar).
    """
    ev, logits, _ = _score_split(session, task, split, prompt, loss, on_chunk=on_chunk)
    return ev, logits


def evaluate_materialized(session: Session, task: TaskSpec, split: Split, prompt: Prompt,
                          on_chunk=None) -> tuple[Evaluation, np.ndarray, np.ndarray]:
    """`evaluate_split`, and the prompt as the model received it (p0 + A z, [layers, L, H]) from the
    same requests: only the server knows p0, and asking it separately would cost a query."""
    return _score_split(session, task, split, prompt, "ce", return_prompts=True, on_chunk=on_chunk)


def score_candidates(session: Session, task: TaskSpec, split: Split, candidates, k: int, loss: str = "ce",
                     return_prompts: bool = False, on_chunk=None):
    """Class logits [K, N, C] of `k` candidates (a request's `candidates`, None: no soft prompt) on
    a split, one request per EVAL_CHUNK inputs, each booked as evaluation (k queries: `Session.score`); with
    `return_prompts`, also the prompts [K, layers, L, H] the server received. `on_chunk(n)`: called
    after each request with its number of inputs."""
    req = EvaluateRequest(model=session.model, task=task, inputs=split.examples, return_logits=True, loss=loss,
                          candidates=candidates, return_prompts=return_prompts)
    answers = session.score(req, k, chunk=EVAL_CHUNK, on_chunk=on_chunk)
    chunks = [resp.logits.to_numpy() for resp in answers]  # (K, n, C)
    received = answers[0].prompts.to_numpy() if return_prompts else None  # Session.score refuses a missing one
    return np.concatenate(chunks, axis=1), received


def _score_split(session, task, split, prompt, loss, return_prompts: bool = False, on_chunk=None):
    candidates = None if prompt is None else prompt.candidates()
    logits, received = score_candidates(session, task, split, candidates, 1, loss, return_prompts, on_chunk)
    return Evaluation.of(logits[0], split.labels, task.metric, loss), logits[0], None if received is None else received[0]


@contextlib.contextmanager
def scoring_bar(what: str, examples: int, enabled: bool):
    """A progress bar over the `examples` a scoring pass sends (it moves once per request of up to
    EVAL_CHUNK); yields its `on_chunk` callback, None when bars are off. Gone once the pass ends."""
    if not enabled:
        yield None
        return
    from tqdm import tqdm

    with tqdm(total=examples, unit="example", desc=what, dynamic_ncols=True, leave=False) as bar:
        yield bar.update
