"""Exports a fine-tuned sequence classifier to ONNX and checks it against PyTorch.

Writes into --out:
- `model.onnx`: inputs `input_ids`, `attention_mask`, `token_type_ids` (int64, dynamic batch and
  sequence axes), output `logits` (float32, batch × 2);
- `tokenizer.json`;
- `export.json`: opset, max_length, truncation, the parity check (max |Δlogit| between PyTorch and
  ONNX Runtime on real validation reviews; the export fails above --tolerance), the optional int8
  quantisation's accuracy change, and reference probabilities from Python ONNX Runtime on those
  reviews, which the Rust evaluation compares with its own.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pyarrow.parquet as pq
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

OPSET = 17
INPUTS = ["input_ids", "attention_mask", "token_type_ids"]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="directory written by finetune.py")
    p.add_argument("--split", required=True, help="directory with valid.parquet")
    p.add_argument("--out", required=True)
    p.add_argument("--max-length", type=int, required=True)
    p.add_argument("--truncation", choices=["head", "head_tail"], default="head", help="as the model was fine-tuned")
    p.add_argument("--parity-reviews", type=int, default=32)
    p.add_argument("--tolerance", type=float, default=1e-4)
    p.add_argument("--quantize", action="store_true", help="ship int8 dynamic quantisation as model.onnx")
    p.add_argument("--quantize-eval", type=int, default=500, help="validation reviews to measure quantisation on")
    return p.parse_args(argv)


def encode(tokenizer, texts, max_length, truncation):
    """The model's inputs for `texts`, padded to the longest: [CLS] + at most max_length - 2 tokens
    of each + [SEP], cut as finetune.py's `token_ids` cuts them (and sentiflow's runtime):
    the first tokens (`head`), or the first quarter, rounded half up, and the last three quarters
    (`head_tail`)."""
    budget = max_length - 2
    head = budget if truncation == "head" else (budget + 2) // 4
    rows = []
    for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]:
        if len(ids) > budget:
            ids = ids[:head] + ids[len(ids) - (budget - head) :]
        rows.append([tokenizer.cls_token_id, *ids, tokenizer.sep_token_id])
    ids = np.full((len(rows), max(map(len, rows))), tokenizer.pad_token_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for i, row in enumerate(rows):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def onnx_logits(session, feeds, batch=32):
    n = len(feeds["input_ids"])
    return np.concatenate(
        [session.run(["logits"], {k: v[i : i + batch] for k, v in feeds.items()})[0] for i in range(0, n, batch)]
    )


def softmax_positive(logits):
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e[:, 1] / e.sum(axis=1)


def session(path):
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


def main(argv):
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(args.checkpoint)
    model = AutoModelForSequenceClassification.from_pretrained(args.checkpoint, dtype=torch.float32).eval()
    model.config.return_dict = False

    table = pq.read_table(Path(args.split) / "valid.parquet", columns=["text", "label"])
    texts = table.column("text").to_pylist()
    labels = np.array(table.column("label").to_pylist())

    sample = encode(tokenizer, texts[:2], args.max_length, args.truncation)
    onnx_path = out / "model.onnx"
    with torch.no_grad():
        torch.onnx.export(
            model,
            tuple(torch.from_numpy(sample[k]) for k in INPUTS),
            str(onnx_path),
            input_names=INPUTS,
            output_names=["logits"],
            dynamic_axes={**{k: {0: "batch", 1: "sequence"} for k in INPUTS}, "logits": {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,
        )

    # Parity on real reviews: padded batches and a single unpadded review.
    parity_texts = texts[: args.parity_reviews]
    feeds = encode(tokenizer, parity_texts, args.max_length, args.truncation)
    with torch.no_grad():
        torch_logits = model(*(torch.from_numpy(feeds[k]) for k in INPUTS))[0].numpy()
    fp32 = session(onnx_path)
    ort_logits = onnx_logits(fp32, feeds)
    single = encode(tokenizer, parity_texts[:1], args.max_length, args.truncation)
    with torch.no_grad():
        torch_single = model(*(torch.from_numpy(single[k]) for k in INPUTS))[0].numpy()
    max_diff = float(
        max(np.abs(torch_logits - ort_logits).max(), np.abs(torch_single - onnx_logits(fp32, single)).max())
    )
    print(
        f"parity: {len(parity_texts)} reviews, max |Δlogit| {max_diff:.3g} (tolerance {args.tolerance:g})", flush=True
    )
    if not max_diff <= args.tolerance:
        sys.exit(f"ONNX export differs from PyTorch: max |Δlogit| {max_diff:.3g} > {args.tolerance:g}")

    report = {
        "opset": OPSET,
        "max_length": args.max_length,
        "truncation": args.truncation,
        "inputs": INPUTS,
        "parity": {"reviews": len(parity_texts), "max_abs_logit_diff": max_diff, "tolerance": args.tolerance},
        "quantization": None,
    }
    if args.quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        int8_path = out / "model.int8.onnx"
        quantize_dynamic(str(onnx_path), str(int8_path), weight_type=QuantType.QInt8)
        n = min(args.quantize_eval, len(texts))
        eval_feeds = encode(tokenizer, texts[:n], args.max_length, args.truncation)
        acc_fp32 = float((onnx_logits(fp32, eval_feeds).argmax(1) == labels[:n]).mean())
        acc_int8 = float((onnx_logits(session(int8_path), eval_feeds).argmax(1) == labels[:n]).mean())
        report["quantization"] = {
            "type": "dynamic int8 (weights)",
            "reviews": n,
            "accuracy_fp32": acc_fp32,
            "accuracy_int8": acc_int8,
            "accuracy_change": acc_int8 - acc_fp32,
            "bytes_fp32": onnx_path.stat().st_size,
            "bytes_int8": int8_path.stat().st_size,
        }
        print(f"int8: accuracy {acc_fp32:.4f} -> {acc_int8:.4f} on {n} reviews", flush=True)
        int8_path.replace(onnx_path)
        fp32 = session(onnx_path)

    # What Python ONNX Runtime says about these reviews, one at a time as a client would send them.
    probs = [
        float(softmax_positive(onnx_logits(fp32, encode(tokenizer, [t], args.max_length, args.truncation)))[0])
        for t in parity_texts
    ]
    report["reference"] = [{"text": t, "p_positive": p} for t, p in zip(parity_texts, probs, strict=True)]
    tokenizer.backend_tokenizer.save(str(out / "tokenizer.json"))
    (out / "export.json").write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
