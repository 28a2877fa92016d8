"""A run's one way to its model: every paid query goes out through `Session.query`.

The search, the verbalizer choice, evaluation and ensembles all ask through a session, so what a
paid query needs is written once: whether the budget affords it, the evaluation cache (an answer
already paid for is not paid again, and says who paid it), and its line in the run's ledger. The
model's card (`ModelInfo`, free) is asked once per session, and a split's token counts and hidden
states' spread (`stats`, no query) once per template and split.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from bbt.backends.base import Backend, PayerTagging
from bbt.budget import Ledger
from bbt.data import Split
from bbt.errors import ConfigError
from bbt.protocol import EvaluateRequest, EvaluateResponse, ModelInfo, StatsRequest, StatsResponse, TaskSpec, Usage


@dataclass
class Session:
    """`backend` serving `model`, its queries booked on `ledger` (None: booked nowhere, as for a
    prediction). A run opens one and hands it to the search, the word choice and evaluation."""

    backend: Backend
    model: str
    ledger: Ledger | None = None
    card: ModelInfo | None = field(default=None, repr=False)  # the model's card, where the caller has it already
    _stats: dict = field(default_factory=dict, init=False, repr=False)

    @property
    def info(self) -> ModelInfo:
        """The model's card, asked of the backend once."""
        if self.card is None:
            self.card = self.backend.model_info(self.model)
        return self.card

    def stats(self, task: TaskSpec, split: Split) -> StatsResponse:
        """Each input's tokens (template included, prompt excluded) and the spread of each layer's
        hidden states on `split` under `task`'s template, asked of the backend once: the words and
        label texts change neither (a verbalizer is read at {mask}; an encoder's label texts are
        not its input), so the word choice and the search share one answer."""
        key = (task.template, task.pair, id(split))
        if key not in self._stats:  # the split is kept with its answer, so that its id is not reused
            self._stats[key] = (split, self.backend.stats(StatsRequest(model=self.model, task=task, inputs=split.examples)))
        return self._stats[key][1]

    def affordable(self, k: int, *, examples: int, tokens: int) -> int:
        """How many of `k` queries of `examples` inputs and `tokens` tokens each the budget still pays for."""
        if self.ledger is None:
            return k
        return self.ledger.affordable(k, examples_per_query=examples, tokens_per_query=tokens)

    def query(self, request: EvaluateRequest, *, tuning: bool, queries: int, examples: int,
              tokens: int | None = None) -> EvaluateResponse:
        """One request, answered from the cache when the backend keeps one, and booked on the ledger
        (`tuning`: counted against the query budget; else evaluation) against what the client
        expected it to cost: `queries`, `examples` and `tokens` (None: the answer's own count)."""
        payer = None if self.ledger is None else self.ledger.payer()
        if isinstance(self.backend, PayerTagging):  # an answer from a cache says who paid for it
            resp, paid_by = self.backend.evaluate_tagged(request, payer)
        else:
            resp, paid_by = self.backend.evaluate(request), None
        if self.ledger is not None:
            expected = Usage(queries=queries, requests=1, examples=examples,
                             tokens=resp.usage.tokens if tokens is None else tokens)
            self.ledger.record(resp.usage, expected=expected, tuning=tuning, paid_by=paid_by)
        return resp

    def score(self, request: EvaluateRequest, k: int, *, chunk: int,
              on_chunk: Callable[[int], None] | None = None) -> list[EvaluateResponse]:
        """`request` (of `k` candidates) sent in requests of at most `chunk` of its inputs (and
        labels), each booked as evaluation, `k` queries; only the first asks for the prompts the
        server received (`return_prompts`), and a server that does not send them is refused there.
        `on_chunk(n)`: called after each with its inputs."""
        answers = []
        for start in range(0, len(request.inputs), chunk):
            inputs = request.inputs[start : start + chunk]
            labels = None if request.labels is None else request.labels[start : start + chunk]
            part = request.model_copy(update={"inputs": inputs, "labels": labels,
                                              "return_prompts": request.return_prompts and start == 0})
            answers.append(self.query(part, tuning=False, queries=k, examples=k * len(inputs)))
            if part.return_prompts and answers[-1].prompts is None:  # said before the other chunks are paid
                raise ConfigError("the server did not return the prompts it received (return_prompts): it runs an "
                                  "older bbt")
            if on_chunk is not None:
                on_chunk(len(inputs))
        return answers
