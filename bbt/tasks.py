"""Task specs: template, verbalizer and label texts for the seven BBT tasks, and user tasks.

A task is a `bbt.protocol.TaskSpec`. Built-in tasks follow the BBT paper's templates and
verbalizers; `label_texts` are the descriptions a sentence encoder compares inputs with. A user
task comes from a JSON or YAML file with at least `labels`; missing fields get sane defaults.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from pydantic import ValidationError

from bbt.errors import ConfigError
from bbt.protocol import TaskSpec

_SENTIMENT = dict(
    labels=["negative", "positive"],
    template="{text} . It was {mask} .",
    verbalizer=["bad", "great"],
    label_texts=["It was bad.", "It was great."],
)

BUILTIN_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in [
        TaskSpec(name="sst2", **_SENTIMENT),
        TaskSpec(name="yelpp", **_SENTIMENT),
        TaskSpec(
            name="agnews",
            labels=["World", "Sports", "Business", "Tech"],
            template="{mask} News: {text}",
            verbalizer=["World", "Sports", "Business", "Tech"],
            label_texts=["World news.", "Sports news.", "Business news.", "Technology news."],
        ),
        TaskSpec(
            name="dbpedia",
            labels=[
                "Company", "EducationalInstitution", "Artist", "Athlete", "OfficeHolder",
                "MeanOfTransportation", "Building", "NaturalPlace", "Village", "Animal", "Plant",
                "Album", "Film", "WrittenWork",
            ],
            template="[ Category: {mask} ] {text}",
            verbalizer=[
                "Company", "Education", "Artist", "Athlete", "Office", "Transportation", "Building",
                "Natural", "Village", "Animal", "Plant", "Album", "Film", "Written",
            ],
            label_texts=[
                "A company.", "A school or university.", "An artist.", "An athlete.",
                "A politician in office.", "A vehicle, ship or aircraft.", "A building.",
                "A natural place: a river, lake or mountain.", "A village.", "An animal.", "A plant.",
                "A music album.", "A film.", "A book or other written work.",
            ],
        ),
        TaskSpec(
            name="mrpc",
            labels=["not_equivalent", "equivalent"],
            template="{text} ? {mask} , {text_pair}",
            verbalizer=["No", "Yes"],
            label_texts=["The two sentences mean different things.", "The two sentences mean the same thing."],
            pair=True,
            metric="f1",
        ),
        TaskSpec(
            name="rte",
            labels=["entailment", "not_entailment"],
            template="{text} ? {mask} , {text_pair}",
            verbalizer=["Yes", "No"],
            label_texts=["The second sentence follows from the first.", "The second sentence does not follow from the first."],
            pair=True,
        ),
        TaskSpec(
            name="snli",
            labels=["entailment", "neutral", "contradiction"],
            template="{text} ? {mask} , {text_pair}",
            verbalizer=["Yes", "Maybe", "No"],
            label_texts=["The second sentence is true.", "The second sentence may be true.", "The second sentence is false."],
            pair=True,
        ),
    ]
}


# Causal LMs read the class at the next token, so the input must come before {mask}: the BBT
# paper's "{mask} News: {text}" cannot work there. These were chosen on SmolLM2-135M-Instruct by
# accuracy with no soft prompt on the 16-shot train + dev splits of seeds 13, 42 and 87
# (`experiments/choose_templates.py`; never on a test set). name -> (template, verbalizer)
CAUSAL_TEMPLATES: dict[str, tuple[str, list[str]]] = {
    "sst2": ("Review: {text}\nSentiment: {mask}", ["negative", "positive"]),
    "yelpp": ("Review: {text}\nSentiment: {mask}", ["negative", "positive"]),
    "agnews": ("Article: {text}\nThis article is about {mask}", ["world", "sports", "business", "technology"]),
    "rte": ("{text}\nQuestion: {text_pair} True or False?\nAnswer: {mask}", ["True", "False"]),
    "dbpedia": ("{text}\nCategory: {mask}", ["Company", "School", "Artist", "Athlete", "Politician", "Transportation",
                                           "Building", "Nature", "Village", "Animal", "Plant", "Album", "Film", "Book"]),
    "mrpc": ('{text} Question: Does this mean the same as "{text_pair}"? Answer: {mask}', ["No", "Yes"]),
    "snli": ('<|im_start|>user\n{text}\nIs it true that "{text_pair}"? Answer Yes, No or Maybe.<|im_end|>\n'
             "<|im_start|>assistant\n{mask}", ["Yes", "Maybe", "No"]),
}


def for_family(task: TaskSpec, family: str) -> TaskSpec:
    """The task as a model of `family` should see it: a built-in task left as bbt defines it gets
    its causal-LM template and verbalizer on a causal LM; any other task is returned as it is."""
    if family != "causal" or task.name not in CAUSAL_TEMPLATES or task != BUILTIN_TASKS.get(task.name):
        return task
    template, verbalizer = CAUSAL_TEMPLATES[task.name]
    return task.model_copy(update={"template": template, "verbalizer": list(verbalizer)})


def task_from_dict(data: dict, *, source: str = "task") -> TaskSpec:
    """A TaskSpec from a plain dict; `verbalizer` and `label_texts` default to the label names.

    A dict naming a built-in task (e.g. the `task.json` of a data folder: name, labels, pair)
    starts from that task's template and verbalizer, and fields given in the dict override them.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with at least 'labels', got {type(data).__name__}")
    base = BUILTIN_TASKS.get(str(data.get("name", ""))) if data.get("name") else None
    merged = base.model_dump() if base is not None else {}
    merged.update({k: v for k, v in data.items() if v is not None})
    if base is not None and merged["labels"] != base.labels:
        raise ConfigError(f"{source}: labels {merged['labels']} differ from built-in task {base.name!r}: {base.labels}")
    if "labels" not in merged:
        raise ConfigError(f"{source}: 'labels' is missing (a list of label names in index order)")
    labels = merged["labels"]
    if isinstance(labels, list):
        merged.setdefault("name", "custom")
        merged.setdefault("verbalizer", [str(x) for x in labels])
        merged.setdefault("label_texts", [str(x) for x in merged["verbalizer"]])
        if merged.get("pair") and "template" not in merged:
            merged["template"] = "{text} ? {mask} , {text_pair}"
    try:
        return TaskSpec(**merged)
    except ValidationError as exc:
        raise ConfigError(f"{source}: {_pydantic_message(exc)}") from exc


def load_task_file(path: str | Path) -> TaskSpec:
    """A TaskSpec from a .json, .yaml or .yml file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise ConfigError(f"cannot read task file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) if path.suffix in (".yaml", ".yml") else json.loads(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"task file {path} is not valid {path.suffix.lstrip('.').upper() or 'JSON'}: {exc}") from exc
    return task_from_dict(data, source=str(path))


def resolve_task(task: str | None, data_dir: str | Path | None = None) -> TaskSpec:
    """The task for a run: a built-in name, a task file, or the `task.json` of the data folder."""
    if task is None:
        if data_dir is None or not (Path(data_dir) / "task.json").is_file():
            raise ConfigError("no task: pass --task NAME|FILE or a --data folder with a task.json")
        return load_task_file(Path(data_dir) / "task.json")
    if task in BUILTIN_TASKS:
        if data_dir is not None and (Path(data_dir) / "task.json").is_file():
            folder_task = load_task_file(Path(data_dir) / "task.json")
            if folder_task.labels != BUILTIN_TASKS[task].labels:
                raise ConfigError(f"--task {task} has labels {BUILTIN_TASKS[task].labels}, but {data_dir}/task.json has {folder_task.labels}")
        return BUILTIN_TASKS[task]
    if Path(task).suffix in (".json", ".yaml", ".yml") or Path(task).is_file():
        return load_task_file(task)
    raise ConfigError(f"unknown task {task!r}: use one of {', '.join(BUILTIN_TASKS)} or a .json/.yaml task file")


def _pydantic_message(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'task'}: {err['msg']}" for err in exc.errors()
    )
