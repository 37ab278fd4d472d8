"""stages/bert/finetune.py: how long reviews are cut (`head`, `head_tail`), the same cut in the
ONNX export and in the MLflow loader, the seeded class-balanced subset, and fine-tuning that
gives the same weights for the same seed."""

import json

import pytest
import torch
from conftest import write_part
from safetensors.torch import load_file


@pytest.fixture(scope="module")
def words(tokenizer):
    """300 distinct words that are one MiniLM token each, and their ids."""
    vocab = tokenizer.get_vocab()
    picked = []
    for token, id_ in sorted(vocab.items(), key=lambda kv: kv[1]):
        one_token = tokenizer(token, add_special_tokens=False)["input_ids"] == [id_]
        if token.isascii() and token.isalpha() and len(token) >= 4 and one_token:
            picked.append((token, id_))
        if len(picked) == 300:
            break
    assert len(picked) == 300
    return [w for w, _ in picked], [i for _, i in picked]


def review(words, n):
    return " ".join(words[0][:n]), words[1][:n]


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
@pytest.mark.parametrize("n", [0, 1, 10, 126])
def test_reviews_within_the_budget_are_not_cut(finetune, tokenizer, words, truncation, n):
    text, ids = review(words, n)
    [row] = finetune.token_ids(tokenizer, [text], 128, truncation)
    assert row == [tokenizer.cls_token_id, *ids, tokenizer.sep_token_id]


def test_head_keeps_the_first_tokens(finetune, tokenizer, words):
    text, ids = review(words, 300)
    [row] = finetune.token_ids(tokenizer, [text], 128, "head")
    assert row == [tokenizer.cls_token_id, *ids[:126], tokenizer.sep_token_id]


def test_head_tail_keeps_the_first_quarter_and_the_last_three_quarters(finetune, tokenizer, words):
    text, ids = review(words, 300)
    [row] = finetune.token_ids(tokenizer, [text], 128, "head_tail")
    # 32 + 94 at max_length 128, as the stage's documentation says.
    assert row == [tokenizer.cls_token_id, *ids[:32], *ids[-94:], tokenizer.sep_token_id]
    assert len(row) == 128


@pytest.mark.parametrize(
    ("max_length", "head"),
    # The head is a quarter of max_length - 2, rounded half up: 1.25 -> 1, 1.5 -> 2, 2.5 -> 3.
    [(6, 1), (7, 1), (8, 2), (9, 2), (12, 3), (13, 3), (14, 3), (130, 32), (132, 33)],
)
def test_head_tail_rounds_the_quarter_half_up(finetune, tokenizer, words, max_length, head):
    text, ids = review(words, 300)
    [row] = finetune.token_ids(tokenizer, [text], max_length, "head_tail")
    tail = max_length - 2 - head
    assert row[1 : 1 + head] == ids[:head]
    assert row[1 + head : -1] == ids[len(ids) - tail :]
    assert len(row) == max_length


def test_a_batch_is_cut_review_by_review(finetune, tokenizer, words):
    long_text, long_ids = review(words, 300)
    short_text, short_ids = review(words, 5)
    rows = finetune.token_ids(tokenizer, [short_text, long_text, ""], 16, "head_tail")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert rows == [[cls, *short_ids, sep], [cls, *long_ids[:4], *long_ids[-10:], sep], [cls, sep]]
    assert finetune.token_ids(tokenizer, [], 16, "head") == []


@pytest.mark.parametrize("truncation", ["head", "head_tail"])
def test_export_and_the_mlflow_loader_cut_reviews_as_fine_tuning_does(
    finetune, export_onnx, pyfunc, tokenizer, words, truncation
):
    texts = [review(words, n)[0] for n in (0, 3, 30, 31, 62, 300)] + ["It's <b>great</b> &amp; naïve!"]
    max_length = 32
    rows = finetune.token_ids(tokenizer, texts, max_length, truncation)
    # export_onnx.py pads the batch to its longest row; the mask gives each row back.
    feeds = export_onnx.encode(tokenizer, texts, max_length, truncation)
    exported = [list(ids[mask == 1]) for ids, mask in zip(feeds["input_ids"], feeds["attention_mask"], strict=True)]
    assert exported == rows
    assert feeds["input_ids"].shape == (len(texts), max(map(len, rows)))
    # The MLflow loader cuts a `tokenizers` encoding with the bundle's max_length and truncation.
    loader = pyfunc.BertModel.__new__(pyfunc.BertModel)
    loader.budget, loader.head_tail = max_length - 2, truncation == "head_tail"
    loader.cls, loader.sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    backend = tokenizer.backend_tokenizer
    assert [loader.ids(backend.encode(t, add_special_tokens=False)) for t in texts] == rows


@pytest.fixture
def unbalanced(tmp_path):
    """70 negative and 30 positive reviews, each naming its row."""
    path = tmp_path / "train.parquet"
    labels = [0] * 70 + [1] * 30
    write_part(path, [f"review {i}" for i in range(100)], labels)
    return path


def test_the_subset_is_class_balanced(finetune, unbalanced):
    texts, labels = finetune.read_split(unbalanced, 20, 42)
    assert len(texts) == 20 and labels.count(0) == 10 and labels.count(1) == 10
    texts, labels = finetune.read_split(unbalanced, 21, 42)
    assert labels.count(0) == 10 and labels.count(1) == 11
    # A class with fewer reviews than its half gives all it has.
    texts, labels = finetune.read_split(unbalanced, 80, 42)
    assert labels.count(0) == 40 and labels.count(1) == 30


def test_the_subset_keeps_each_review_with_its_label_in_file_order(finetune, unbalanced):
    texts, labels = finetune.read_split(unbalanced, 20, 7)
    rows = [int(t.split()[1]) for t in texts]
    assert rows == sorted(rows)
    assert labels == [int(r >= 70) for r in rows]


def test_the_subset_is_seeded(finetune, unbalanced):
    first = finetune.read_split(unbalanced, 20, 42)
    assert finetune.read_split(unbalanced, 20, 42) == first
    others = {tuple(finetune.read_split(unbalanced, 20, seed)[0]) for seed in range(1, 6)}
    assert tuple(first[0]) not in others and len(others) == 5


@pytest.mark.parametrize("limit", [0, 100, 1000])
def test_no_subset_reads_every_review_in_order(finetune, unbalanced, limit):
    texts, labels = finetune.read_split(unbalanced, limit, 42)
    assert texts == [f"review {i}" for i in range(100)]
    assert labels == [0] * 70 + [1] * 30


def fine_tune(finetune, checkpoint, split, out, seed, *extra):
    finetune.main(
        [
            *("--split", str(split), "--base-model", str(checkpoint), "--out", str(out)),
            *("--max-length", "32", "--truncation", "head_tail", "--batch-size", "4", "--lr", "1e-3"),
            *("--seed", str(seed), *extra),
        ]
    )
    return load_file(out / "model.safetensors"), json.loads((out / "metrics.json").read_text())


def test_fine_tuning_gives_the_same_weights_for_the_same_seed(finetune, tiny_checkpoint, split_dir, tmp_path):
    first, report = fine_tune(finetune, tiny_checkpoint, split_dir, tmp_path / "a", 7)
    again, _ = fine_tune(finetune, tiny_checkpoint, split_dir, tmp_path / "b", 7)
    other, _ = fine_tune(finetune, tiny_checkpoint, split_dir, tmp_path / "c", 8)
    start = load_file(tiny_checkpoint / "model.safetensors")
    assert first.keys() == again.keys()
    assert all(torch.equal(first[k], again[k]) for k in first)
    # It trained, and another seed (shuffle, classifier head) trains to other weights.
    assert not all(torch.equal(first[k], start[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    assert report["train_reviews"] == 13 and report["valid_reviews"] == 5 and report["world_size"] == 1
    assert [e["epoch"] for e in report["epochs"]] == [1] and 0 <= report["valid_accuracy"] <= 1


def test_fine_tuning_on_a_subset(finetune, tiny_checkpoint, split_dir, tmp_path):
    _, report = fine_tune(
        finetune, tiny_checkpoint, split_dir, tmp_path / "a", 7, "--subset", "6", "--eval-subset", "4"
    )
    assert report["train_reviews"] == 6 and report["valid_reviews"] == 4
