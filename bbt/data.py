"""Labelled examples: file loaders, the task-folder layout, and a seeded k-shot sampler.

Files: JSONL (one {"text", "text_pair"?, "label"} object a line), CSV or TSV with a header
holding `text`, optional `text_pair` and `label`. A label is an index or a label name.

Task folder (the layout of the shared benchmark data)::

    TASK/task.json                    {"name", "labels", "pair"} (+ optional template, ...)
    TASK/16shot/seedS/train.jsonl     k examples per class
    TASK/16shot/seedS/dev.jsonl
    TASK/test.jsonl                   optional
    TASK/train.jsonl + TASK/dev.jsonl a user's own fixed splits, used as given (no k-shot draw)
    TASK/pool.jsonl | train.jsonl     a pool (a train.jsonl without a dev.jsonl is one): k-shot train
                                      and dev are drawn from it when no seedS folder exists

The first of these that the folder has decides: the seedS split, the fixed splits, the pool.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from bbt.errors import ConfigError, DataError
from bbt.protocol import Example, TaskSpec

log = logging.getLogger(__name__)

# characters per text field: the bundled server's default limit (servers/service.py, max_text_chars),
# checked here so that an oversized row is refused before any model loads
MAX_TEXT_CHARS = 20_000


@dataclass
class Split:
    """N examples with their labels."""

    examples: list[Example]
    labels: list[int]
    # lines of the file left out as bad rows (`load_file(..., skip_bad_rows=True)`), with why
    skipped: list[tuple[int, str]] = field(default_factory=list, compare=False)

    def __len__(self) -> int:
        return len(self.examples)

    def sample(self, limit: int | None, seed: int = 0) -> Split:
        """At most `limit` examples drawn with `seed`, in their original order (None: all of them).

        Benchmarks score a large test set (AG News has 7,600) on the same sample for every run.
        """
        if limit is None or len(self) <= limit:
            return self
        keep = sorted(np.random.default_rng(seed).choice(len(self), size=limit, replace=False).tolist())
        return Split([self.examples[i] for i in keep], [self.labels[i] for i in keep])


@dataclass
class TaskData:
    train: Split
    dev: Split
    test: Split | None
    test_name: str = "test"  # "dev" where the folder has no test set
    notes: list[str] = field(default_factory=list)


def load_file(path: str | Path, task: TaskSpec, *, skip_bad_rows: bool = False) -> Split:
    """Read a .jsonl, .csv or .tsv file of labelled examples; errors name the file and line.

    Files are UTF-8, with or without a byte-order mark (as spreadsheet programs write them). A row
    whose text (or text_pair) is missing, empty or over MAX_TEXT_CHARS characters is refused, or
    with `skip_bad_rows` left out and listed in `Split.skipped`; every other error is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in (".jsonl", ".csv", ".tsv"):
        raise DataError(f"{path}: unsupported file type {suffix!r}; use .jsonl, .csv or .tsv")
    fh = io.StringIO(_utf8_text(path), newline="")
    if suffix == ".jsonl":
        rows = list(_jsonl_rows(fh, path))
    else:
        rows = list(_table_rows(fh, path, delimiter="\t" if suffix == ".tsv" else ","))
    examples, labels, skipped = [], [], []
    for line_no, row in rows:
        where = f"{path}:{line_no}"
        why = _bad_text(row, task)
        if why is not None and skip_bad_rows:
            skipped.append((line_no, why))
            continue
        if why is not None:
            raise DataError(f"{where}: {why} (--skip-bad-rows leaves such rows out)")
        ex, y = _parse_row(row, task, where)
        examples.append(ex)
        labels.append(y)
    if not examples:
        raise DataError(f"{path}: no examples" + (f" ({len(skipped)} bad rows skipped)" if skipped else ""))
    return Split(examples, labels, skipped)


def _utf8_text(path: Path) -> str:
    """The file's text; bytes that are not UTF-8 are refused with their line."""
    raw = path.read_bytes()
    if raw.startswith(codecs.BOM_UTF8):
        raw = raw[len(codecs.BOM_UTF8):]
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text ({exc.reason}); save the file as UTF-8") from None


def _jsonl_rows(fh, path: Path):
    for line_no, line in enumerate(fh, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{line_no}: not valid JSON ({exc.msg})") from exc
        if not isinstance(row, dict):
            raise DataError(f"{path}:{line_no}: expected an object with 'text' and 'label'")
        yield line_no, row


def _table_rows(fh, path: Path, delimiter: str):
    """(line, {column: value}) of a CSV/TSV file with a header; the line is where the row starts
    (a quoted field may span several lines); blank lines are skipped."""
    reader = csv.reader(fh, delimiter=delimiter)
    kind, sep = ("TSV", "tab") if delimiter == "\t" else ("CSV", "comma")
    try:
        header = next(reader, None)
        names = [name.strip() for name in header] if header else None
        if names is None or "text" not in names or "label" not in names:
            raise DataError(f"{path}: the header must name 'text' and 'label' columns, got {names}")
        start = reader.line_num + 1
        for row in reader:
            if row and any(cell.strip() for cell in row):
                if len(row) != len(names):
                    raise DataError(f"{path}:{start}: {len(row)} fields, the header has {len(names)} "
                                    f"({sep}-separated: quote a field that holds a {sep})")
                yield start, dict(zip(names, row))
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DataError(f"{path}:{reader.line_num}: not valid {kind} ({exc})") from exc


def _bad_text(row: dict, task: TaskSpec) -> str | None:
    """Why the row's text (or text_pair, in a pair task) cannot be scored, or None: the rows that
    --skip-bad-rows leaves out."""
    text = row.get("text")
    if not isinstance(text, str) or not text.strip():
        return "'text' is missing or empty"
    pair = row.get("text_pair") or None
    if task.pair and not isinstance(pair, str):
        return f"task {task.name!r} is a pair task but 'text_pair' is missing"
    for name, value in (("text", text), ("text_pair", pair if task.pair else None)):
        if value is not None and len(value) > MAX_TEXT_CHARS:
            return f"'{name}' has {len(value):,} characters; the limit is {MAX_TEXT_CHARS:,}"
    return None


def _parse_row(row: dict, task: TaskSpec, where: str) -> tuple[Example, int]:
    text = row["text"]
    pair = row.get("text_pair") or None
    raw = row.get("label")
    if isinstance(raw, str) and raw in task.labels:
        label = task.labels.index(raw)
    else:
        try:
            label = int(raw)
        except (TypeError, ValueError):
            raise DataError(f"{where}: label {raw!r} is neither an index nor one of {task.labels}") from None
        if str(raw).strip() != str(label) and not isinstance(raw, int):
            raise DataError(f"{where}: label {raw!r} is not an integer")
    if not 0 <= label < len(task.labels):
        raise DataError(f"{where}: label {label} outside 0..{len(task.labels) - 1}")
    return Example(text=text, text_pair=pair if task.pair else None), label


def k_shot(split: Split, k: int, seed: int, n_classes: int, *, exclude: set[int] | frozenset = frozenset()) -> tuple[Split, list[int]]:
    """k examples per class drawn without replacement (seeded); returns them and their indices.

    Indices in `exclude` are never drawn, so a dev split sampled with the train indices excluded
    is disjoint from train. A class with fewer than k candidates is a DataError.
    """
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    chosen: list[int] = []
    for c in range(n_classes):
        pool = [i for i in np.flatnonzero(labels == c) if i not in exclude]
        if len(pool) < k:
            raise DataError(f"class {c} has {len(pool)} examples left, {k} needed for a {k}-shot split")
        chosen.extend(int(i) for i in rng.choice(pool, size=k, replace=False))
    return Split([split.examples[i] for i in chosen], [split.labels[i] for i in chosen]), chosen


def load_task_folder(folder: str | Path, task: TaskSpec, *, seed: int, k: int = 16,
                     skip_bad_rows: bool = False) -> TaskData:
    """train/dev/test of a task folder: its k-shot split for `seed`, else its own train and dev
    files as given, else a k-shot train and dev drawn from its pool (see the module's layout).

    With `skip_bad_rows`, rows `load_file` would refuse for their text are left out; the notes say
    how many, per file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"data folder not found: {folder}")
    notes: list[str] = []

    def load(path: Path) -> Split:
        split = load_file(path, task, skip_bad_rows=skip_bad_rows)
        if split.skipped:
            notes.append(_skipped_note(path, split.skipped))
        return split

    shot_dir = folder / f"{k}shot" / f"seed{seed}"
    given = _maybe(folder, "train"), _maybe(folder, "dev")
    if shot_dir.is_dir():
        train = load(_one_of(shot_dir, "train"))
        dev = load(_one_of(shot_dir, "dev"))
    elif all(given):
        train, dev = load(given[0]), load(given[1])
        notes.append(f"train and dev as given in {given[0].name} and {given[1].name} ({len(train)} and {len(dev)} "
                     "examples; no k-shot draw)")
    else:
        pool_file = next((p for p in (_maybe(folder, "pool"), given[0]) if p), None)
        if pool_file is None:
            have = sorted(p.name for p in (folder / f"{k}shot").glob("seed*")) if (folder / f"{k}shot").is_dir() else []
            raise DataError(
                f"{folder}: no {k}shot/seed{seed}/ split here, nor a train.jsonl with a dev.jsonl (used as given), nor "
                "a pool.jsonl or train.jsonl to sample one from" + (f" (splits present: {', '.join(have)})" if have else "")
            )
        pool = load(pool_file)
        _check_pool(pool, k, task, pool_file)
        train, used = k_shot(pool, k, seed, len(task.labels))
        dev, _ = k_shot(pool, k, seed + 1, len(task.labels), exclude=set(used))
        notes.append(f"sampled {k}-shot train and dev from {pool_file.name} with seed {seed}")
    test_file = _maybe(folder, "test")
    if test_file is not None:
        return TaskData(train, dev, load(test_file), "test", notes)
    notes.append("no test set in the folder: test metrics are measured on the dev split")
    return TaskData(train, dev, dev, "dev", notes)


def limit_test(data: TaskData, limit: int | None) -> TaskData:
    """`data` with at most `limit` test examples, a seeded sample (`Split.sample`: the same for
    every run and sweep cell); None or 0: all of them."""
    if limit is not None and limit < 0:
        raise ConfigError(f"--test-limit {limit}: give a number of test examples, or 0 for all")
    if not limit or data.test is None:
        return data
    return TaskData(data.train, data.dev, data.test.sample(limit), data.test_name, data.notes)


def _check_pool(pool: Split, k: int, task: TaskSpec, path: Path) -> None:
    """Refuse a pool with too few examples of a label for disjoint k-shot train and dev splits,
    naming the file, the label and the --k-shot that fits."""
    counts = np.bincount(np.asarray(pool.labels, dtype=int), minlength=len(task.labels))
    if counts.min() >= 2 * k:
        return
    c = int(counts.argmin())
    fits = int(counts.min()) // 2
    raise DataError(
        f"{path}: label {task.labels[c]!r} has {counts[c]} examples, and a {k}-shot split draws {k} for train and "
        f"{k} others for dev ({2 * k}): "
        + (f"lower --k-shot to {fits} or less, " if fits else f"add examples of {task.labels[c]!r}, ")
        + ("or add a dev.jsonl beside it: a train.jsonl with a dev.jsonl is used as given" if path.stem == "train"
           else "or give your own train.jsonl and dev.jsonl beside it (used as given)")
    )


def _skipped_note(path: Path, skipped: list[tuple[int, str]]) -> str:
    """One line on the bad rows of a file left out: how many, where and why (the first few)."""
    shown = ", ".join(f"line {line}: {why}" for line, why in skipped[:3])
    more = f", and {len(skipped) - 3} more" if len(skipped) > 3 else ""
    return f"skipped {len(skipped)} bad row{'s' if len(skipped) > 1 else ''} of {path} ({shown}{more})"


def _maybe(folder: Path, stem: str) -> Path | None:
    for suffix in (".jsonl", ".csv", ".tsv"):
        if (folder / f"{stem}{suffix}").is_file():
            return folder / f"{stem}{suffix}"
    return None


def _one_of(folder: Path, stem: str) -> Path:
    found = _maybe(folder, stem)
    if found is None:
        raise DataError(f"{folder}: no {stem}.jsonl, {stem}.csv or {stem}.tsv")
    return found
