"""MLflow `python_function` flavor of a sentiflow bundle.

`mlflow.pyfunc.load_model(uri)` imports this module from the bundle and calls `_load_pyfunc` with
the bundle's directory. `predict` takes texts (a list, a string, a pandas Series, or a DataFrame
whose `text` column, or else first column, holds them) and returns a DataFrame with `label`
(`negative` or `positive`) and `score` (P(positive)), as `sentiflow predict` does.

A TF-IDF bundle is scored with NumPy and SciPy from its vocabulary (`unigrams.txt`, `ngrams.bin`),
`idf.bin`, `model.json` and `weights.bin`; texts are normalised and tokenised as sentiflow does,
with the character classes and HTML entities that sentiflow wrote into `text_rules.json`. A BERT
bundle runs `model.onnx` with ONNX Runtime on tokens from `tokenizer.json` (`tokenizers`).
"""

import json
import math
import os
import re
import unicodedata

import numpy as np
import pandas as pd

LABELS = ("negative", "positive")


def _load_pyfunc(path):
    with open(os.path.join(path, "manifest.json"), encoding="utf-8") as f:
        manifest = json.load(f)
    kind = manifest.get("kind")
    if kind == "tfidf":
        return TfidfModel(path)
    if kind == "bert":
        return BertModel(path, manifest)
    raise ValueError(f"{path}: not a sentiflow bundle of a known kind ({kind!r})")


def _texts(model_input):
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        column = "text" if "text" in model_input.columns else model_input.columns[0]
        model_input = model_input[column]
    if isinstance(model_input, dict):
        model_input = model_input.get("text", next(iter(model_input.values()), []))
    return ["" if t is None else str(t) for t in list(model_input)]


def _frame(scores):
    scores = np.asarray(scores, dtype=np.float64)
    return pd.DataFrame({"label": [LABELS[int(s > 0.5)] for s in scores], "score": scores})


def _char_class(ranges):
    return "".join(f"\\U{lo:08x}-\\U{hi:08x}" for lo, hi in ranges)


class TextRules:
    """sentiflow's text normalisation (src/text.rs): HTML tags removed, entities decoded, NFKC,
    optional lowercasing, whitespace collapsed; and its default tokens, runs of two or more word
    characters."""

    _NUMBER = {10: re.compile("[0-9]+"), 16: re.compile("[0-9a-fA-F]+")}
    _DELIMITER = re.compile("[&;]")

    def __init__(self, rules):
        self.entities = rules["entities"]
        self.whitespace = re.compile(f"[{_char_class(rules['whitespace'])}]+")
        self.words = re.compile(f"[{_char_class(rules['word_chars'])}]{{2,}}")

    def normalize(self, text, lowercase):
        s = _strip_tags(text) if "<" in text else text
        if "&" in s:
            s = self.decode_entities(s)
            # Entities can produce new tags (`&lt;br&gt;`).
            if "<" in s:
                s = _strip_tags(s)
        if not s.isascii():
            s = unicodedata.normalize("NFKC", s)
        if lowercase:
            s = s.lower()
        return " ".join(w for w in self.whitespace.split(s) if w)

    def decode_entities(self, text):
        out = []
        start = 0
        while True:
            found = self._find_entity(text, start)
            if found is None:
                break
            begin, end, value = found
            out.append(text[start:begin])
            out.append(value)
            start = end
        out.append(text[start:])
        return "".join(out)

    def _find_entity(self, t, p):
        # Only complete references ending with `;`, named or numeric, as sentiflow's decoder.
        n = len(t)
        while True:
            p = t.find("&", p)
            if p < 0:
                return None
            begin = p
            p += 1
            if p == n:
                return None
            radix = None
            if t[p] == "#":
                radix = 10
                p += 1
                if p == n:
                    return None
                if t[p] in "xX":
                    radix = 16
                    p += 1
                    if p == n:
                        return None
            if t[p] == "&":
                continue
            if t[p] == ";":
                p += 1
                continue
            body = p
            m = self._DELIMITER.search(t, p + 1)
            if m is None:
                return None
            p = m.start()
            if t[p] == "&":
                continue
            value = self._value(t[body:p], radix)
            if value is not None:
                return begin, p + 1, value
            p += 1

    def _value(self, body, radix):
        if radix is None:
            return self.entities.get(body)
        if not self._NUMBER[radix].fullmatch(body):
            return None
        number = int(body, radix)
        if number > 0x10FFFF or 0xD800 <= number <= 0xDFFF:
            return None
        if number < 0x20 and number not in (0x09, 0x0A, 0x0C, 0x0D):
            return None
        return chr(number)


def _strip_tags(text):
    """Replaces each `<…>` tag (a `<` then a letter, `/` or `!`) by a space."""
    out = []
    rest = text
    while True:
        i = rest.find("<")
        if i < 0:
            break
        out.append(rest[:i])
        after = rest[i:]
        close = after.find(">")
        first = after[1:2]
        if close >= 0 and first and ((first.isascii() and first.isalpha()) or first in "/!"):
            out.append(" ")
            rest = after[close + 1 :]
        else:
            out.append("<")
            rest = after[1:]
    out.append(rest)
    return "".join(out)


def _read_floats(path, count):
    values = np.fromfile(path, dtype="<f4")
    if len(values) != count:
        raise ValueError(f"{path}: {len(values)} values, expected {count}")
    return values


class TfidfModel:
    """TF-IDF over word n-grams (src/models/tfidf.rs) and a linear model (src/models/linear.rs)."""

    ID_BITS = 21

    def __init__(self, path):
        def load_json(name):
            with open(os.path.join(path, name), encoding="utf-8") as f:
                return json.load(f)

        self.config = load_json("vectorizer.json")
        self.rules = TextRules(load_json("text_rules.json"))
        if self.config["token_pattern"] == r"(?u)\b\w\w+\b":
            self.tokens = self.rules.words.findall
        else:
            # Python's `re` for a custom pattern: the same tokens for ordinary patterns.
            pattern = re.compile(self.config["token_pattern"])
            self.tokens = lambda text: [m.group(0) for m in pattern.finditer(text)]
        with open(os.path.join(path, "unigrams.txt"), "rb") as f:
            names = f.read().decode("utf-8").split("\n")[:-1]
        self.unigrams = {name: i + 1 for i, name in enumerate(names)}
        keys = np.fromfile(os.path.join(path, "ngrams.bin"), dtype="<u8")
        self.columns = {int(k): c for c, k in enumerate(keys)}
        self.idf = _read_floats(os.path.join(path, "idf.bin"), len(keys)).astype(np.float64)
        self.weights = _read_floats(os.path.join(path, "weights.bin"), len(keys)).astype(np.float64)
        model = load_json("model.json")
        self.bias = float(model["bias"])
        self.platt = (float(model["platt"][0]), float(model["platt"][1]))

    def row(self, text):
        """The text's TF-IDF row: sorted columns and float32 values."""
        normalized = self.rules.normalize(text, self.config["lowercase"])
        ids = [self.unigrams.get(t, 0) for t in self.tokens(normalized)]
        lo, hi = self.config["ngram"]
        counts = {}
        for n in range(lo, hi + 1):
            for i in range(len(ids) - n + 1):
                window = ids[i : i + n]
                if 0 in window:
                    continue
                key = 0
                for j, token in enumerate(window):
                    key |= token << (self.ID_BITS * j)
                column = self.columns.get(key)
                if column is not None:
                    counts[column] = counts.get(column, 0) + 1
        cols = np.array(sorted(counts), dtype=np.int64)
        if self.config["binary"]:
            tf = np.ones(len(cols))
        elif self.config["sublinear_tf"]:
            tf = np.array([1.0 + math.log(counts[c]) for c in cols])
        else:
            tf = np.array([float(counts[c]) for c in cols])
        values = (tf * self.idf[cols]).astype(np.float32)
        if self.config["l2_norm"]:
            # Summed in column order, as sentiflow does, so that the rounding is the same.
            norm = math.sqrt(sum(v * v for v in values.astype(np.float64).tolist()))
            if norm > 0.0:
                values = (values.astype(np.float64) / norm).astype(np.float32)
        return cols, values

    def predict_proba(self, texts):
        from scipy.sparse import csr_matrix

        rows = [self.row(t) for t in texts]
        indptr = np.cumsum([0] + [len(c) for c, _ in rows])
        indices = np.concatenate([c for c, _ in rows] + [np.zeros(0, dtype=np.int64)])
        data = np.concatenate([v for _, v in rows] + [np.zeros(0, dtype=np.float32)])
        x = csr_matrix((data.astype(np.float64), indices, indptr), shape=(len(rows), len(self.weights)))
        a, c = self.platt
        z = a * (x @ self.weights + self.bias) + c
        e = np.exp(-np.abs(z))
        return np.where(z >= 0, 1.0 / (1.0 + e), e / (1.0 + e))

    def predict(self, model_input, params=None):
        return _frame(self.predict_proba(_texts(model_input)))


class BertModel:
    """An ONNX classifier on `tokenizers` tokens (src/models/bert.rs): [CLS] + tokens cut to
    `max_length` (head, or head and tail) + [SEP], one text per pass."""

    def __init__(self, path, manifest):
        import onnxruntime
        from tokenizers import Tokenizer

        self.session = onnxruntime.InferenceSession(
            os.path.join(path, "model.onnx"), providers=["CPUExecutionProvider"]
        )
        self.tokenizer = Tokenizer.from_file(os.path.join(path, "tokenizer.json"))
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.budget = max(manifest["max_length"] - 2, 0)
        self.head_tail = manifest.get("truncation", "head") == "head_tail"
        self.cls = self.tokenizer.token_to_id("[CLS]")
        self.sep = self.tokenizer.token_to_id("[SEP]")

    def ids(self, encoding):
        ids = list(encoding.ids)
        if len(ids) > self.budget:
            head = (self.budget + 2) // 4 if self.head_tail else self.budget
            ids = ids[:head] + ids[len(ids) - (self.budget - head) :]
        return [self.cls] + ids + [self.sep]

    def predict_proba(self, texts):
        scores = []
        for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False):
            ids = np.array([self.ids(encoding)], dtype=np.int64)
            (logits,) = self.session.run(
                ["logits"],
                {
                    "input_ids": ids,
                    "attention_mask": np.ones_like(ids),
                    "token_type_ids": np.zeros_like(ids),
                },
            )
            negative, positive = (float(v) for v in logits[0])
            scores.append(1.0 / (1.0 + math.exp(negative - positive)))
        return np.array(scores, dtype=np.float64)

    def predict(self, model_input, params=None):
        return _frame(self.predict_proba(_texts(model_input)))
