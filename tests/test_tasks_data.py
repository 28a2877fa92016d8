"""Task specs (templates, verbalizers), user task files, data loaders and their errors, the k-shot sampler."""

from __future__ import annotations

import json
from collections import Counter

import pytest

from bbt.data import Split, k_shot, load_file, load_task_folder
from bbt.errors import ConfigError, DataError
from bbt.protocol import Example, TaskSpec
from bbt.tasks import BUILTIN_TASKS, load_task_file, resolve_task, task_from_dict
from conftest import SHARED_DATA, sentiment_sentences, write_jsonl

PAIR = TaskSpec(name="rte", labels=["entailment", "not_entailment"], template="{text} ? {mask} , {text_pair}",
                verbalizer=["Yes", "No"], label_texts=["yes", "no"], pair=True)


# ---- built-in tasks: the BBT paper's templates and verbalizers ----------------------------------

def test_builtin_tasks_are_the_seven_of_the_paper():
    assert set(BUILTIN_TASKS) == {"sst2", "yelpp", "agnews", "dbpedia", "mrpc", "rte", "snli"}
    assert BUILTIN_TASKS["sst2"].template == "{text} . It was {mask} ."
    assert BUILTIN_TASKS["sst2"].verbalizer == ["bad", "great"]
    assert BUILTIN_TASKS["agnews"].template == "{mask} News: {text}"
    assert BUILTIN_TASKS["agnews"].verbalizer == ["World", "Sports", "Business", "Tech"]
    assert BUILTIN_TASKS["dbpedia"].template == "[ Category: {mask} ] {text}"
    assert BUILTIN_TASKS["mrpc"].verbalizer == ["No", "Yes"] and BUILTIN_TASKS["mrpc"].metric == "f1"
    assert BUILTIN_TASKS["rte"].verbalizer == ["Yes", "No"]
    assert BUILTIN_TASKS["snli"].verbalizer == ["Yes", "Maybe", "No"]
    assert {n for n, t in BUILTIN_TASKS.items() if t.metric == "f1"} == {"mrpc"}


@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_template_formats_and_verbalizer_fits(name):
    task = BUILTIN_TASKS[name]
    assert task.name == name
    text = task.template.format(text="AAA", text_pair="BBB", mask="<M>")
    assert text.count("AAA") == 1 and text.count("<M>") == 1
    assert (text.count("BBB") == 1) == task.pair
    n = len(task.labels)
    assert len(task.verbalizer) == len(task.label_texts) == n
    assert len(set(task.verbalizer)) == n and len(set(task.label_texts)) == n


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared benchmark data not found at {SHARED_DATA}")
@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_builtin_labels_agree_with_the_shared_task_json(name):
    folder = SHARED_DATA / name
    if not (folder / "task.json").is_file():
        pytest.skip(f"{folder}/task.json not present")
    from_folder = resolve_task(None, folder)
    assert from_folder.labels == BUILTIN_TASKS[name].labels
    assert from_folder.pair == BUILTIN_TASKS[name].pair
    # the folder's task.json names the built-in task, so it gets its template and verbalizer
    assert from_folder.template == BUILTIN_TASKS[name].template
    assert from_folder.verbalizer == BUILTIN_TASKS[name].verbalizer
    assert resolve_task(name, folder) == BUILTIN_TASKS[name]


@pytest.mark.parametrize("change,message", [
    (dict(verbalizer=["bad"]), "verbalizer has 1 entries"),
    (dict(label_texts=["a", "b", "c"]), "label_texts has 3 entries"),
    (dict(template="{text} is it"), "must contain"),
    (dict(template="It was {mask} ."), "must contain"),
    (dict(pair=True), "text_pair"),
    (dict(labels=["a", "b", "c"], verbalizer=["x", "y", "z"], label_texts=["x", "y", "z"], metric="f1"), "two-class"),
    (dict(labels=["only"], verbalizer=["x"], label_texts=["x"]), "labels"),
])
def test_taskspec_rejects_inconsistent_fields(change, message):
    good = dict(name="t", labels=["neg", "pos"], verbalizer=["bad", "great"], label_texts=["bad", "great"])
    with pytest.raises(ValueError, match=message):
        TaskSpec(**{**good, **change})


# ---- user tasks -----------------------------------------------------------------------------

def test_task_from_dict_fills_defaults_from_the_labels():
    task = task_from_dict({"labels": ["spam", "ham"]})
    assert task.name == "custom"
    assert task.verbalizer == ["spam", "ham"] and task.label_texts == ["spam", "ham"]
    assert task.template == TaskSpec.model_fields["template"].default
    pair = task_from_dict({"name": "nli", "labels": ["yes", "no"], "pair": True})
    assert "{text_pair}" in pair.template and pair.pair
    given = task_from_dict({"labels": ["a", "b"], "verbalizer": ["x", "y"]})
    assert given.label_texts == ["x", "y"]


def test_task_from_dict_starts_from_a_named_builtin_and_overrides():
    task = task_from_dict({"name": "sst2", "labels": ["negative", "positive"], "pair": False,
                           "verbalizer": ["terrible", "wonderful"]})
    assert task.template == BUILTIN_TASKS["sst2"].template
    assert task.label_texts == BUILTIN_TASKS["sst2"].label_texts
    assert task.verbalizer == ["terrible", "wonderful"]


@pytest.mark.parametrize("data,message", [
    ({"name": "sst2", "labels": ["neg", "pos"]}, "differ from built-in task 'sst2'"),
    ({"name": "x"}, "'labels' is missing"),
    (["a", "b"], "expected a mapping"),
    ({"labels": ["a", "b"], "verbalizer": ["x"]}, "verbalizer"),
])
def test_task_from_dict_errors_name_the_source(data, message):
    with pytest.raises(ConfigError, match=message) as info:
        task_from_dict(data, source="my/task.json")
    assert "my/task.json" in str(info.value)


def test_task_files_json_and_yaml(tmp_path):
    (tmp_path / "t.json").write_text(json.dumps({"name": "topic", "labels": ["a", "b", "c"], "template": "{mask} : {text}"}))
    (tmp_path / "t.yaml").write_text("name: topic\nlabels: [a, b, c]\ntemplate: '{mask} : {text}'\n")
    assert load_task_file(tmp_path / "t.json") == load_task_file(tmp_path / "t.yaml")
    assert load_task_file(tmp_path / "t.yaml").labels == ["a", "b", "c"]
    assert resolve_task(str(tmp_path / "t.yaml")).template == "{mask} : {text}"


@pytest.mark.parametrize("name,content,message", [
    ("bad.json", "{labels: [a, b]", "not valid JSON"),
    ("bad.yaml", "labels: [a, b\n", "not valid YAML"),
    ("list.json", "[1, 2]", "expected a mapping"),
])
def test_bad_task_files_are_config_errors_naming_the_file(tmp_path, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(ConfigError, match=message) as info:
        load_task_file(tmp_path / name)
    assert name in str(info.value)


def test_missing_task_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read task file"):
        load_task_file(tmp_path / "nope.json")


def test_resolve_task(tmp_path, data_dir):
    assert resolve_task("agnews") is BUILTIN_TASKS["agnews"]
    assert resolve_task(None, data_dir) == BUILTIN_TASKS["sst2"]
    with pytest.raises(ConfigError, match="unknown task 'nosuch'"):
        resolve_task("nosuch")
    with pytest.raises(ConfigError, match="no task"):
        resolve_task(None, tmp_path)
    with pytest.raises(ConfigError, match="--task agnews has labels"):
        resolve_task("agnews", data_dir)  # the folder's task.json is a two-class sentiment task


# ---- loaders --------------------------------------------------------------------------------

def test_load_jsonl_csv_tsv_agree(tmp_path, sst2_task):
    rows = [{"text": "fine, really", "label": 1}, {"text": 'said "no"', "label": "negative"}, {"text": "ok", "label": "1"}]
    write_jsonl(tmp_path / "a.jsonl", rows)
    (tmp_path / "a.csv").write_text('text,label\n"fine, really",1\n"said ""no""",negative\nok,1\n')
    (tmp_path / "a.tsv").write_text('text\tlabel\nfine, really\t1\nsaid "no"\tnegative\nok\t1\n')
    want = Split([Example(text="fine, really"), Example(text='said "no"'), Example(text="ok")], [1, 0, 1])
    for name in ("a.jsonl", "a.csv", "a.tsv"):
        assert load_file(tmp_path / name, sst2_task) == want, name


def test_load_pairs_and_blank_lines(tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [{"text": "a", "text_pair": "b", "label": "not_entailment"}])
    with (tmp_path / "p.jsonl").open("a") as fh:
        fh.write("\n   \n" + json.dumps({"text": "c", "text_pair": "d", "label": 0}) + "\n")
    split = load_file(tmp_path / "p.jsonl", PAIR)
    assert split.labels == [1, 0]
    assert split.examples[1] == Example(text="c", text_pair="d")


def test_text_pair_is_dropped_for_single_text_tasks(tmp_path, sst2_task):
    write_jsonl(tmp_path / "x.jsonl", [{"text": "a", "text_pair": "b", "label": 0}])
    assert load_file(tmp_path / "x.jsonl", sst2_task).examples == [Example(text="a")]


BAD_ROWS = [
    ('{"text": "ok", "label": 0}\n{"text": "broken", "label": \n', 2, "not valid JSON"),
    ('{"text": "ok", "label": 0}\n\n["a list"]\n', 3, "expected an object"),
    ('{"label": 0}\n', 1, "'text' is missing or empty"),
    ('{"text": "  ", "label": 0}\n', 1, "'text' is missing or empty"),
    ('{"text": "a", "label": 0}\n{"text": "a", "label": 2}\n', 2, "label 2 outside 0..1"),
    ('{"text": "a", "label": -1}\n', 1, "outside"),
    ('{"text": "a", "label": "maybe"}\n', 1, "neither an index nor one of"),
    ('{"text": "a", "label": 1.5}\n', 1, "not an integer"),
    ('{"text": "a"}\n', 1, "label None"),
]


@pytest.mark.parametrize("content,line,message", BAD_ROWS)
def test_bad_jsonl_rows_name_file_and_line(tmp_path, sst2_task, content, line, message):
    path = tmp_path / "train.jsonl"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_file(path, sst2_task)
    assert f"{path}:{line}:" in str(info.value)


def test_pair_task_row_without_pair(tmp_path):
    path = write_jsonl(tmp_path / "dev.jsonl", [{"text": "a", "text_pair": "b", "label": 0}, {"text": "a", "label": 0}])
    with pytest.raises(DataError, match="pair task but 'text_pair' is missing") as info:
        load_file(path, PAIR)
    assert f"{path}:2:" in str(info.value)


def test_bad_csv_rows_name_the_line(tmp_path, sst2_task):
    path = tmp_path / "d.csv"
    path.write_text("text,label\ngood,1\nbad,7\n")
    with pytest.raises(DataError, match=f"{path}:3: label 7"):
        load_file(path, sst2_task)


@pytest.mark.parametrize("name,content", [
    ("b.csv", 'text,label\n"fine, really",1\nbad,negative\n'),
    ("b.tsv", "text\tlabel\nfine, really\t1\nbad\tnegative\n"),
    ("b.jsonl", '{"text": "fine, really", "label": 1}\n{"text": "bad", "label": "negative"}\n'),
])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, sst2_task, name, content):
    """Spreadsheet programs save "CSV UTF-8" with a BOM; the first column must still be 'text'."""
    want = Split([Example(text="fine, really"), Example(text="bad")], [1, 0])
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.encode("utf-8"))
    assert load_file(tmp_path / name, sst2_task) == want
    # and errors still name the right line
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + content.replace("negative", "neutral").encode("utf-8"))
    line = 2 if name.endswith(".jsonl") else 3  # a table's first line is its header
    with pytest.raises(DataError, match=f"{tmp_path / name}:{line}: label 'neutral'"):
        load_file(tmp_path / name, sst2_task)


def test_csv_lines_count_blank_lines_and_multiline_fields(tmp_path, sst2_task):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n\n"two\nlines",1\n\nok,0\n"three\n\nlines",1\n , \nbad,9\n')
    with pytest.raises(DataError, match=f"{path}:11: label 9"):
        load_file(path, sst2_task)
    path.write_text('text,label\n\n"two\nlines",1\n\nok,0\n"three\n\nlines",1\n , \n')
    assert load_file(path, sst2_task).examples[2] == Example(text="three\n\nlines")
    path.write_text(" text , label \nok,1\n")  # spaces around header names
    assert load_file(path, sst2_task).labels == [1]


@pytest.mark.parametrize("name,content,line,message", [
    ("d.csv", "text,label\nok,1\nwell, fine,1\n", 3, "3 fields, the header has 2 .comma-separated"),
    ("d.tsv", "text\tlabel\nok\n", 2, "1 fields, the header has 2 .tab-separated"),
    ("d.csv", 'text,label\nok,1\n"never closed,1\n', 3, "1 fields"),
    ("d.csv", "text,label\nok,1\n" + "x" * 140_000 + ",1\n", 3, "not valid CSV .field larger than field limit"),
])
def test_malformed_csv_rows_name_file_and_line(tmp_path, sst2_task, name, content, line, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_file(path, sst2_task)
    assert f"{path}:{line}:" in str(info.value)


@pytest.mark.parametrize("name,content,message", [
    ("d.csv", "sentence,label\na,1\n", "header must name 'text' and 'label'"),
    ("d.csv", "", "header must name"),
    ("d.txt", "a\t1\n", "unsupported file type '.txt'"),
    ("d.jsonl", "\n\n", "no examples"),
])
def test_bad_files(tmp_path, sst2_task, name, content, message):
    (tmp_path / name).write_text(content)
    with pytest.raises(DataError, match=message) as info:
        load_file(tmp_path / name, sst2_task)
    assert str(tmp_path / name) in str(info.value)


def test_non_utf8_and_missing_files(tmp_path, sst2_task):
    (tmp_path / "latin.jsonl").write_bytes('{"text": "caf\xe9", "label": 0}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_file(tmp_path / "latin.jsonl", sst2_task)
    with pytest.raises(DataError, match="data file not found"):
        load_file(tmp_path / "none.jsonl", sst2_task)


# ---- the k-shot sampler ---------------------------------------------------------------------

def _pool(per_class: list[int]) -> Split:
    labels = [c for c, n in enumerate(per_class) for _ in range(n)]
    return Split([Example(text=f"t{i}") for i in range(len(labels))], labels)


def test_k_shot_draws_k_per_class_reproducibly():
    pool = _pool([10, 12, 9])
    split, idx = k_shot(pool, 4, seed=5, n_classes=3)
    assert Counter(split.labels) == {0: 4, 1: 4, 2: 4}
    assert len(set(idx)) == 12
    assert [pool.labels[i] for i in idx] == split.labels
    assert [pool.examples[i] for i in idx] == split.examples
    again, idx_again = k_shot(pool, 4, seed=5, n_classes=3)
    assert idx_again == idx and again == split
    assert k_shot(pool, 4, seed=6, n_classes=3)[1] != idx


def test_k_shot_seeds_cover_the_pool():
    """Different seeds draw different examples: over many seeds every example of a class shows up."""
    pool = _pool([6, 6])
    seen = set()
    for seed in range(30):
        seen.update(k_shot(pool, 2, seed=seed, n_classes=2)[1])
    assert seen == set(range(12))


def test_k_shot_exclude_keeps_splits_disjoint():
    pool = _pool([8, 8])
    _, train = k_shot(pool, 4, seed=1, n_classes=2)
    _, dev = k_shot(pool, 4, seed=2, n_classes=2, exclude=set(train))
    assert not set(train) & set(dev)
    assert sorted(train + dev) == list(range(16))  # 4 + 4 of 8 per class: all used, none twice


def test_k_shot_too_few_examples():
    with pytest.raises(DataError, match="class 1 has 3 examples left, 4 needed"):
        k_shot(_pool([5, 3]), 4, seed=0, n_classes=2)
    _, used = k_shot(_pool([5, 5]), 3, seed=0, n_classes=2)
    with pytest.raises(DataError, match="examples left"):
        k_shot(_pool([5, 5]), 3, seed=1, n_classes=2, exclude=set(used))


# ---- task folders ---------------------------------------------------------------------------

def test_task_folder_with_split_and_test(data_dir, sst2_task):
    data = load_task_folder(data_dir, sst2_task, seed=42)
    assert (len(data.train), len(data.dev), len(data.test)) == (8, 8, 12)
    assert data.test_name == "test" and data.notes == []
    assert Counter(data.train.labels) == {0: 4, 1: 4}
    other = load_task_folder(data_dir, sst2_task, seed=13)
    assert other.train != data.train  # the seed picks the split folder


def test_task_folder_sampled_from_a_pool_without_test(tmp_path, sst2_task):
    write_jsonl(tmp_path / "pool.jsonl", sentiment_sentences(0, 10))
    data = load_task_folder(tmp_path, sst2_task, seed=3, k=4)
    assert Counter(data.train.labels) == {0: 4, 1: 4} and Counter(data.dev.labels) == {0: 4, 1: 4}
    assert data.test is data.dev and data.test_name == "dev"
    assert any("sampled 4-shot" in n for n in data.notes)
    assert any("no test set" in n for n in data.notes)
    assert load_task_folder(tmp_path, sst2_task, seed=3, k=4).train == data.train


def test_pool_sampled_train_and_dev_are_disjoint(tmp_path, sst2_task):
    rows = [{"text": f"example number {i}", "label": i % 2} for i in range(20)]
    write_jsonl(tmp_path / "train.jsonl", rows)  # a train.jsonl at the top is a pool too
    data = load_task_folder(tmp_path, sst2_task, seed=8, k=5)
    train_texts = {e.text for e in data.train.examples}
    dev_texts = {e.text for e in data.dev.examples}
    assert len(train_texts) == 10 and len(dev_texts) == 10
    assert not train_texts & dev_texts


def test_task_folder_errors(tmp_path, data_dir, sst2_task):
    with pytest.raises(DataError, match="data folder not found"):
        load_task_folder(tmp_path / "missing", sst2_task, seed=42)
    with pytest.raises(DataError, match=r"no 16shot/seed7/ split .* \(splits present: seed13, seed42\)"):
        load_task_folder(data_dir, sst2_task, seed=7)
    (tmp_path / "16shot" / "seed1").mkdir(parents=True)
    write_jsonl(tmp_path / "16shot" / "seed1" / "train.jsonl", sentiment_sentences(0, 2))
    with pytest.raises(DataError, match="no dev.jsonl, dev.csv or dev.tsv"):
        load_task_folder(tmp_path, sst2_task, seed=1)


@pytest.mark.skipif(not SHARED_DATA.is_dir(), reason=f"shared benchmark data not found at {SHARED_DATA}")
@pytest.mark.parametrize("name", sorted(BUILTIN_TASKS))
def test_shared_folders_load_as_16_shot(name):
    folder = SHARED_DATA / name
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    task = resolve_task(name, folder)
    data = load_task_folder(folder, task, seed=42)
    n = len(task.labels)
    assert Counter(data.train.labels) == {c: 16 for c in range(n)}
    assert Counter(data.dev.labels) == {c: 16 for c in range(n)}
    assert data.test_name == ("test" if (folder / "test.jsonl").is_file() else "dev")
    if task.pair:
        assert all(e.text_pair for e in data.train.examples)


def test_split_sample_is_seeded_ordered_and_paired():
    split = Split([Example(text=str(i)) for i in range(50)], [i % 3 for i in range(50)])
    a, b = split.sample(10), split.sample(10)
    assert len(a) == 10 and a.examples == b.examples  # the same sample every time
    idx = [int(e.text) for e in a.examples]
    assert idx == sorted(idx) and len(set(idx)) == 10  # original order, no repeats
    assert a.labels == [i % 3 for i in idx]  # labels stay with their examples
    assert split.sample(10, seed=1).examples != a.examples
    assert split.sample(None) is split and split.sample(50) is split


def test_built_in_tasks_take_their_causal_template_on_a_causal_lm_only():
    from bbt.tasks import BUILTIN_TASKS, CAUSAL_TEMPLATES, for_family

    assert set(CAUSAL_TEMPLATES) == set(BUILTIN_TASKS)
    for name, task in BUILTIN_TASKS.items():
        causal = for_family(task, "causal")
        template, verbalizer = CAUSAL_TEMPLATES[name]
        assert (causal.template, causal.verbalizer) == (template, verbalizer)
        # the input comes before {mask}: a causal LM reads the class at the next token
        before = causal.template.split("{mask}")[0]
        assert "{text}" in before and ("{text_pair}" in before or not task.pair)
        assert causal.labels == task.labels and causal.label_texts == task.label_texts
        assert for_family(task, "masked") is task and for_family(task, "encoder") is task
        assert for_family(causal, "causal") is causal  # already adapted: left alone
    mine = BUILTIN_TASKS["sst2"].model_copy(update={"template": "{text} Verdict: {mask}"})
    assert for_family(mine, "causal") is mine  # a template the user chose is kept
