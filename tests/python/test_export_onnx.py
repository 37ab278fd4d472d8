"""stages/bert/export_onnx.py: a faithful export passes its parity check against PyTorch and
records what Python ONNX Runtime says; an export whose outputs differ from PyTorch's fails it,
unless they differ by less than the tolerance."""

import copy
import json
import re

import numpy as np
import onnxruntime as ort
import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def export(export_onnx, checkpoint, split, out, *extra):
    export_onnx.main(
        [
            *("--checkpoint", str(checkpoint), "--split", str(split), "--out", str(out)),
            *("--max-length", "32", "--truncation", "head_tail", "--parity-reviews", "4", *extra),
        ]
    )
    return json.loads((out / "export.json").read_text())


def p_positive(logits):
    z = np.asarray(logits, dtype=np.float64)
    return float(1 / (1 + np.exp(z[0] - z[1])))


def test_a_faithful_export_passes_and_records_onnx_runtime_probabilities(
    export_onnx, tiny_checkpoint, split_dir, tmp_path
):
    report = export(export_onnx, tiny_checkpoint, split_dir, tmp_path)
    assert report["parity"]["reviews"] == 4
    assert 0 <= report["parity"]["max_abs_logit_diff"] <= report["parity"]["tolerance"] == 1e-4
    assert report["truncation"] == "head_tail" and report["max_length"] == 32 and report["quantization"] is None
    assert {p.name for p in tmp_path.iterdir()} >= {"model.onnx", "tokenizer.json", "export.json"}

    # The reference probabilities are ONNX Runtime's, one review at a time, and PyTorch agrees.
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    model = AutoModelForSequenceClassification.from_pretrained(tiny_checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    assert len(report["reference"]) == 4
    for ref in report["reference"]:
        feeds = export_onnx.encode(tokenizer, [ref["text"]], 32, "head_tail")
        onnx = p_positive(session.run(["logits"], feeds)[0][0])
        with torch.no_grad():
            torch_logits = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).logits[0]
        assert ref["p_positive"] == pytest.approx(onnx, abs=1e-7)
        assert ref["p_positive"] == pytest.approx(p_positive(torch_logits.numpy()), abs=1e-4)
    # The longest validation review was cut to max_length.
    assert export_onnx.encode(tokenizer, [report["reference"][-1]["text"]], 32, "head_tail")["input_ids"].shape[1] <= 32


@pytest.fixture
def unfaithful_export(monkeypatch):
    """torch.onnx.export writing a graph whose positive logit is 0.05 above the model's: what an
    exporter bug, or a model changed between export and check, would give."""
    real = torch.onnx.export

    def shifted(model, *args, **kwargs):
        changed = copy.deepcopy(model)
        with torch.no_grad():
            changed.classifier.bias[1] += 0.05
        return real(changed, *args, **kwargs)

    monkeypatch.setattr(torch.onnx, "export", shifted)


def test_an_export_that_changes_the_outputs_fails(export_onnx, tiny_checkpoint, split_dir, tmp_path, unfaithful_export):
    with pytest.raises(SystemExit) as failed:
        export(export_onnx, tiny_checkpoint, split_dir, tmp_path)
    message = str(failed.value.code)
    assert message.startswith("ONNX export differs from PyTorch: max |Δlogit|")
    measured = float(re.search(r"max \|Δlogit\| (\S+) >", message).group(1))
    assert measured == pytest.approx(0.05, abs=1e-3)
    assert not (tmp_path / "export.json").exists()


def test_the_tolerance_decides(export_onnx, tiny_checkpoint, split_dir, tmp_path, unfaithful_export):
    report = export(export_onnx, tiny_checkpoint, split_dir, tmp_path, "--tolerance", "0.1")
    assert report["parity"]["max_abs_logit_diff"] == pytest.approx(0.05, abs=1e-3)


def test_a_quantized_export_reports_its_accuracy_change(export_onnx, tiny_checkpoint, split_dir, tmp_path):
    report = export(export_onnx, tiny_checkpoint, split_dir, tmp_path, "--quantize", "--quantize-eval", "5")
    q = report["quantization"]
    assert q["reviews"] == 5 and 0 <= q["accuracy_int8"] <= 1
    assert q["accuracy_change"] == pytest.approx(q["accuracy_int8"] - q["accuracy_fp32"])
    # model.onnx is now the int8 model, and the reference probabilities are its own.
    assert (tmp_path / "model.onnx").stat().st_size == q["bytes_int8"] < q["bytes_fp32"]
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    tokenizer = AutoTokenizer.from_pretrained(tiny_checkpoint)
    ref = report["reference"][0]
    feeds = export_onnx.encode(tokenizer, [ref["text"]], 32, "head_tail")
    assert ref["p_positive"] == pytest.approx(p_positive(session.run(["logits"], feeds)[0][0]), abs=1e-7)
