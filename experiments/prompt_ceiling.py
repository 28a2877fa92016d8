"""How far can tuning on one 16-shot split lift the plain model? Oracles, not methods.

    cd /work/main && . .venv/bin/activate
    python experiments/prompt_ceiling.py --model minilm --task sst2 --seed 42 --test-limit 300
    python experiments/prompt_ceiling.py --kind labels --seeds 13 42 87 --test-limit 0

Each kind learns from the split's training examples alone and scores the test sample after every
epoch; the best of those scores is what the most favourable choice of epoch would return, a
selection rule that peeks at the test set, which no run may do. If even that stays short of a
target gap to the plain model, the target is out of reach of that kind of tuning on that split.

- ``input``  gradient Prompt Tuning (PEFT): the input prompt BBT searches through A, with all of
             its L x H numbers free and the paper's optimizer.
- ``labels`` sentence encoders: a soft prompt read with the label texts instead of the input, so
             the label embeddings move and the inputs' do not (full-batch Adam).
- ``probe``  sentence encoders: a linear classifier on the plain model's unit sentence embeddings,
             the most a fixed embedding offers to any read-out (best weight decay of three, by test).

Prints the plain model and each epoch, as JSON lines.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from bbt.backends import LocalBackend
from bbt.data import load_task_folder
from bbt.protocol import words_of
from bbt.scoring import evaluate_split
from bbt.tasks import BUILTIN_TASKS, for_family
from bbt.session import Session

REPO = Path(__file__).resolve().parents[1]


def emit(**row) -> None:
    print(json.dumps(row), flush=True)


def input_prompt(pm, task, data, test, args) -> list[float]:
    from servers import gradient  # the model side: torch, PEFT

    # test in the place of dev: the "best dev epoch" is then the epoch best on test (the oracle)
    recipe = gradient.Recipe("prompt-tuning", length=args.prompt_length, seed=args.seed, epochs=args.epochs,
                             patience=None)
    result = gradient.train(pm, task, data.train, test, recipe,
                            on_epoch=lambda r: emit(epoch=r["epoch"], train_loss=round(r["train_loss"], 4),
                                                    test=round(100 * r["dev_metric"], 1)))
    return [h["dev_metric"] for h in result.history]


def sentence_units(pm, task, examples):
    """(N, H) unit embeddings of the inputs as the plain model pools them (no prompt)."""
    import torch

    enc = pm.encode(task, examples)
    out = []
    with torch.no_grad():
        for i in range(0, len(examples), 64):
            ids, mask = pm.batch(enc, list(range(i, min(i + 64, len(examples)))), 0)
            out.append(pm.family.pool(pm.model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state, mask))
    return torch.cat(out)


def embedded(pm, task, data, test):
    """The training split and the test sample as the plain model embeds them, with their labels."""
    import torch

    return (sentence_units(pm, task, data.train.examples), torch.tensor(list(data.train.labels)),
            sentence_units(pm, task, test.examples), torch.tensor(list(test.labels)))


def label_prompt(pm, task, data, test, args) -> list[float]:
    import torch
    import torch.nn.functional as F

    from servers.families import ENCODER_LOGIT_SCALE

    torch.manual_seed(args.seed)
    x_train, y_train, x_test, y_test = embedded(pm, task, data, test)
    texts = [words_of(t)[0] for t in task.label_texts]
    batch = pm.family.tokenizer(texts, padding=True, return_tensors="pt").to(pm.device)
    a, n = pm.prompt_at, args.prompt_length
    prompt = torch.nn.Parameter(torch.zeros(n, pm.hidden_size, device=pm.device))

    def labels():  # (C, H): the label texts read with the prompt after the leading specials
        emb = pm.word_embeddings(batch["input_ids"])
        x = torch.cat([emb[:, :a], prompt.expand(len(texts), -1, -1), emb[:, a:]], 1)
        m = batch["attention_mask"]
        mask = torch.cat([m[:, :a], m.new_ones(len(texts), n), m[:, a:]], 1)
        return pm.family.pool(pm.model.base_model(inputs_embeds=x, attention_mask=mask).last_hidden_state, mask, (a, n))

    opt = torch.optim.Adam([prompt], lr=args.lr)
    scores = []
    for epoch in range(1, args.epochs + 1):
        loss = F.cross_entropy(ENCODER_LOGIT_SCALE * x_train @ labels().T, y_train)
        opt.zero_grad()
        loss.backward()
        opt.step()
        with torch.no_grad():
            acc = ((x_test @ labels().T).argmax(1) == y_test).float().mean().item()
        scores.append(acc)
        emit(epoch=epoch, train_loss=round(loss.item(), 4), test=round(100 * acc, 1))
    return scores


def probe(pm, task, data, test, args) -> list[float]:
    import torch
    import torch.nn.functional as F

    from servers.families import ENCODER_LOGIT_SCALE

    x_train, y_train, x_test, y_test = embedded(pm, task, data, test)
    scores = []
    for decay in (1e-3, 1e-2, 1e-1):
        w = torch.zeros(x_train.shape[1], len(task.labels), requires_grad=True)
        opt = torch.optim.Adam([w], lr=0.05)
        for _ in range(300):
            loss = F.cross_entropy(ENCODER_LOGIT_SCALE * x_train @ w, y_train) + decay * w.pow(2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        acc = ((x_test @ w).argmax(1) == y_test).float().mean().item()
        scores.append(acc)
        emit(weight_decay=decay, test=round(100 * acc, 1))
    return scores


KINDS = {"input": input_prompt, "labels": label_prompt, "probe": probe}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", choices=sorted(KINDS), default="input")
    p.add_argument("--model", default="minilm")
    p.add_argument("--task", default="sst2")
    p.add_argument("--seeds", "--seed", type=int, nargs="+", default=[42])
    p.add_argument("--prompt-length", type=int, default=50)
    p.add_argument("--epochs", type=int, default=None, help="default: 20 (input), 60 (labels: one step each)")
    p.add_argument("--lr", type=float, default=0.01, help="labels: Adam's step size")
    p.add_argument("--test-limit", type=int, default=300, help="seeded test sample (each epoch scores it); 0: all")
    p.add_argument("--data-root", type=Path, default=REPO.parent / "shared" / "data")
    args = p.parse_args()
    args.epochs = args.epochs or {"input": 20, "labels": 60}.get(args.kind, 0)

    backend = LocalBackend([args.model])
    pm = backend.service.get(args.model)
    if args.kind != "input" and pm.family.name != "encoder":
        p.error(f"--kind {args.kind} is for sentence encoders; {args.model} is a {pm.family.name} model")
    task = for_family(BUILTIN_TASKS[args.task], pm.family.name)
    for seed in args.seeds:
        args.seed = seed
        data = load_task_folder(args.data_root / args.task, task, seed=seed)
        test = data.test.sample(args.test_limit or None)
        plain, _ = evaluate_split(Session(backend, args.model), task, test, None)
        emit(kind=args.kind, seed=seed, plain=round(100 * plain.accuracy, 1), test_examples=len(test))
        scores = KINDS[args.kind](pm, task, data, test, args)
        best = max(range(len(scores)), key=scores.__getitem__)
        emit(kind=args.kind, task=args.task, seed=seed, plain=round(100 * plain.accuracy, 1),
             oracle_best=best + 1, oracle_test=round(100 * scores[best], 1),
             gap=round(100 * (scores[best] - plain.accuracy), 1))


if __name__ == "__main__":
    main()
