"""Fine-tunes a BERT-family checkpoint for binary sentiment on the Parquet splits of `uses: split`.

Run directly (one process) or under `torchrun --nproc_per_node N` (distributed data-parallel: gloo
on CPU, nccl on GPU). For a given seed and world size the result is deterministic on one kind of
processor: the subset, the shuffling, the classifier head's initialisation and the kernels are all
seeded. Another kind of processor (AVX-512 rather than AVX2, say) runs other SIMD kernels, which
add in another order, so its weights differ in their last bits and drift apart during training,
to a model of about the same accuracy.

Writes a transformers checkpoint (`config.json`, `model.safetensors`, `tokenizer.json`, …) and
`metrics.json` (per-epoch loss and validation accuracy) into --out.
"""

import argparse
import importlib
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler
from transformers import AutoModelForSequenceClassification, AutoTokenizer, get_linear_schedule_with_warmup

# Deterministic cuBLAS; must be set before CUDA starts.
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--split", required=True, help="directory with train.parquet and valid.parquet")
    p.add_argument("--base-model", required=True, help="local directory, installed model package, or hub id")
    p.add_argument("--out", required=True)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument(
        "--truncation", choices=["head", "head_tail"], default="head", help="which tokens of a longer review to keep"
    )
    p.add_argument("--epochs", type=int, default=1, help="0 scores the base model without training")
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--batch-size", type=int, default=16, help="per process")
    p.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--subset", type=int, default=0, help="training reviews to use (0 = all)")
    p.add_argument("--eval-subset", type=int, default=0, help="validation reviews to score (0 = all)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="bf16/fp16 need a GPU")
    return p.parse_args(argv)


def resolve_base_model(name):
    """A directory, a Python package that carries a model (`get_model_path()` or `MODEL_DIR`), or a hub id."""
    if Path(name).is_dir():
        return str(Path(name).resolve())
    try:
        module = importlib.import_module(name.replace("-", "_"))
    except ImportError:
        return name
    if hasattr(module, "get_model_path"):
        return str(module.get_model_path())
    return str(module.MODEL_DIR)


def read_split(path, limit, seed):
    table = pq.read_table(path, columns=["text", "label"])
    texts = table.column("text").to_pylist()
    labels = [int(x) for x in table.column("label").to_pylist()]
    order = list(range(len(texts)))
    if limit and limit < len(texts):
        # A seeded, class-balanced subset: the same reviews whatever the world size.
        random.Random(seed).shuffle(order)
        per_class = {0: limit // 2, 1: limit - limit // 2}
        picked = []
        for i in order:
            if per_class[labels[i]] > 0:
                per_class[labels[i]] -= 1
                picked.append(i)
        order = sorted(picked)
    return [texts[i] for i in order], [labels[i] for i in order]


def token_ids(tokenizer, texts, max_length, truncation):
    """[CLS] + at most max_length - 2 tokens of each text + [SEP]: the first ones (`head`), or the
    first quarter, rounded half up, and the last three quarters (`head_tail`, Sun et al. 2019).
    export_onnx.py and sentiflow's runtime (`Truncation::apply`) cut texts the same way."""
    if not texts:
        return []
    budget = max_length - 2
    head = budget if truncation == "head" else (budget + 2) // 4
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head) :]
        rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
    return rows


def padded(rows, width, pad_id):
    """The model's inputs for `rows` of token ids, padded to `width`: one sequence each."""
    ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


class Encoded(Dataset):
    def __init__(self, tokenizer, texts, labels, max_length, truncation):
        rows = token_ids(tokenizer, texts, max_length, truncation)
        self.enc = {k: torch.from_numpy(v) for k, v in padded(rows, max_length, tokenizer.pad_token_id).items()}
        self.labels = torch.tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        item = {k: v[i] for k, v in self.enc.items()}
        item["labels"] = self.labels[i]
        return item


def setup_distributed():
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    if world > 1:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return world, rank, device


def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


@torch.no_grad()
def evaluate(model, loader, device, autocast):
    model.eval()
    correct = total = 0
    loss_sum = 0.0
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast():
            out = model(**batch)
        loss_sum += out.loss.float().item() * len(batch["labels"])
        correct += (out.logits.argmax(-1) == batch["labels"]).sum().item()
        total += len(batch["labels"])
    model.train()
    return correct, total, loss_sum


def main(argv):
    args = parse_args(argv)
    world, rank, device = setup_distributed()
    seed_everything(args.seed)
    if device.type == "cpu" and args.precision != "fp32":
        sys.exit(f"--precision {args.precision} needs a GPU; use fp32 on CPU")
    log = (lambda msg: print(msg, flush=True)) if rank == 0 else (lambda msg: None)

    base = resolve_base_model(args.base_model)
    tokenizer = AutoTokenizer.from_pretrained(base)
    model = AutoModelForSequenceClassification.from_pretrained(
        base,
        dtype=torch.float32,
        num_labels=2,
        id2label={0: "negative", 1: "positive"},
        label2id={"negative": 0, "positive": 1},
    ).to(device)
    log(f"base model {base}; {sum(p.numel() for p in model.parameters()):,} parameters; world size {world}; {device}")

    split = Path(args.split)
    # Nothing to train on when only scoring a checkpoint: skip tokenizing the training part.
    train_texts, train_labels = read_split(split / "train.parquet", args.subset, args.seed) if args.epochs else ([], [])
    valid_texts, valid_labels = read_split(split / "valid.parquet", args.eval_subset, args.seed)
    train = Encoded(tokenizer, train_texts, train_labels, args.max_length, args.truncation)
    valid = Encoded(tokenizer, valid_texts, valid_labels, args.max_length, args.truncation)
    log(f"{len(train)} training and {len(valid)} validation reviews, max_length {args.max_length} ({args.truncation})")

    train_sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=args.seed)
    valid_sampler = DistributedSampler(valid, num_replicas=world, rank=rank, shuffle=False)
    generator = torch.Generator().manual_seed(args.seed)
    train_loader = DataLoader(train, batch_size=args.batch_size, sampler=train_sampler, generator=generator)
    valid_loader = DataLoader(valid, batch_size=args.batch_size * 2, sampler=valid_sampler)

    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    no_decay = ("bias", "LayerNorm.weight")
    groups = [
        {
            "params": [p for n, p in model.named_parameters() if not n.endswith(no_decay)],
            "weight_decay": args.weight_decay,
        },
        {"params": [p for n, p in model.named_parameters() if n.endswith(no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr)
    steps = max(args.epochs * len(train_loader), 1)
    scheduler = get_linear_schedule_with_warmup(optimizer, math.ceil(args.warmup * steps), steps)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(args.precision)
    scaler = torch.amp.GradScaler("cuda", enabled=args.precision == "fp16")

    def autocast():
        return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)

    history = []
    started = time.perf_counter()
    model.train()
    for epoch in range(args.epochs):
        train_sampler.set_epoch(epoch)
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for step, batch in enumerate(train_loader):
            batch = {k: v.to(device) for k, v in batch.items()}
            with autocast():
                loss = ddp(**batch).loss
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            scaler.step(optimizer)
            scaler.update()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().float() * len(batch["labels"])
            seen += len(batch["labels"])
            if step % 50 == 0:
                log(f"epoch {epoch + 1}/{args.epochs} step {step + 1}/{len(train_loader)} loss {loss.item():.4f}")
        correct, total, vloss = evaluate(model, valid_loader, device, autocast)
        totals = torch.tensor([loss_sum.item(), seen, correct, total, vloss], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        train_loss, seen, correct, total, vloss = totals.tolist()
        # DistributedSampler pads the validation set to a multiple of the world size; the few
        # repeated reviews shift accuracy by at most (world - 1) / total.
        row = {
            "epoch": epoch + 1,
            "train_loss": train_loss / seen,
            "valid_loss": vloss / total,
            "valid_accuracy": correct / total,
        }
        history.append(row)
        log(json.dumps(row))
    if args.epochs == 0:
        # Nothing to train: score the base model as it is (a checkpoint fine-tuned elsewhere).
        correct, total, vloss = evaluate(model, valid_loader, device, autocast)
        totals = torch.tensor([correct, total, vloss], dtype=torch.float64, device=device)
        if world > 1:
            dist.all_reduce(totals)
        correct, total, vloss = totals.tolist()
        history.append({"epoch": 0, "train_loss": None, "valid_loss": vloss / total, "valid_accuracy": correct / total})
        log(json.dumps(history[-1]))

    log(f"trained in {time.perf_counter() - started:.1f} s")
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        report = {
            "params": {k: v for k, v in vars(args).items() if k not in ("split", "out")},
            "world_size": world,
            "device": device.type,
            "train_reviews": len(train),
            "valid_reviews": len(valid),
            "epochs": history,
            **history[-1],
        }
        (out / "metrics.json").write_text(json.dumps(report, indent=2) + "\n")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
