"""Writes what sentiflow's Rust text code says about awkward reviews, for test_pyfunc_text.py.

The MLflow loader shipped in every bundle (src/models/sentiflow_pyfunc.py) must see texts exactly
as sentiflow does: normalised (src/text.rs `normalize`: tags, entities, NFKC, case, whitespace)
and cut into tokens (`Tokenizer`: the default pattern and the `pipelines/imdb.yaml` one). The
binary has no command that prints those, so this script asks the stages that use them: in a
scratch project it runs a pipeline that loads the reviews below (JSONL), cleans them (`clean`,
with and without lowercasing, keeping every row), and vectorizes them (`vectorize` with raw
counts of 1- and 2-grams, for each token pattern) with every review in the training part;
an `export` stage writes the bundle's `text_rules.json`. From the outputs it writes:

- fixtures/text_rules.json: the bundle's character classes and HTML entities;
- fixtures/text_cases.json: per review, the normalised text (both cases) and, per token pattern,
  the count of every token and every pair of adjacent tokens in its normalised text.

    .venv/bin/python tests/python/make_text_fixture.py [--sentiflow BIN] [--check]

BIN defaults to $SENTIFLOW_BIN, else the release build (`cargo build --release`, in
$CARGO_TARGET_DIR or target/). `--check` compares instead of writing, and exits 1 when the
committed fixtures are not what the binary says (run it after changing src/text.rs).
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).resolve().parent / "fixtures"
WORDS_AND_MARKS = r"(?u)\w+(?:'\w+)*|[^\w\s]"
PATTERNS = {"words": r"(?u)\b\w\w+\b", "words_and_marks": WORDS_AND_MARKS}
# A piece of a very long review: repeated, its end and its start make `&amp;` across each join.
LONG_PIECE = "p; <i>Great</i> O'Brien's naïve ﬁlm — ½ &lt;b&gt;bold&lt;/b&gt; 10/10!!! &am"
CASES = {
    "html_tags_and_entities": "Great<br /><br />film &amp; cast &lt;3  \ufb01ne\tend",
    "entities_named_numeric_and_broken": (
        "Tom &amp; Jerry&#39;s &quot;best&quot; &#x2014; 10&#47;10 &hellip; &copy;2004 &eacute;t&eacute; "
        "&notanentity; &amp no semicolon &#0; &#9;tab &#xD800; &#1114112; &#x1F600; &&amp;; &#; &#x; &AMP; &#X41;"
    ),
    "entities_that_make_tags": "&lt;br /&gt;made by entities&lt;/i&gt; and 3 &lt; 4 &gt; 2 &lt;3",
    "angle_brackets_as_text": "a < b and c > d, <3 <-- <<tag>> </> <!-- comment --> <1a> x <é> y",
    "apostrophes": "it's rock'n'roll, isn't it? 'tis the dogs' x''y _a_ b'_ c' don't stop'n go!",
    "typographic_apostrophes_and_quotes": "O’Brien’s ‘quoted’ “double” don`t rock ʼn roll «guillemets»",
    "non_ascii_letters_and_digits": (
        "naïve café's über-cool ½ ² ³⁄₄ Ⅻ ① ＦＵＬＬ　ｗｉｄｔｈ １２３ ﬁlm ǅ İstanbul Straße ΣΑΣ ΌΣΟΣ 東京の映画 ٣٤ ௰ 𝔘𝔫𝔦"
    ),
    "emoji": "😀👍🏽 👨\u200d👩\u200d👧 🇫🇷 ok👌 ❤️",
    "combining_marks": "e\u0301t\u0301e x\u0301y n\u0303o q\u0307\u0323 \u0301lone",
    "joiners_and_connectors": "a\u200db a\u200cb c\u203fd e\u2040f g\ufe4fh",
    "other_numbers": "x\u0bf0y \u09f4z 5\u2cfd 2\U00010107",
    "whitespace_kinds": (
        "tab\there\u00a0nbsp\u2003em\u3000ideo\u2028line\u0085nel\x0bvt\x0cff\r\ncrlf \u200b zwsp \u180e mvs"
    ),
    "information_separators": "fs\x1cgs\x1drs\x1eus\x1f end",
    "numbers_and_marks": "10/10!!! ...really?! $5.99 -- 50% 3.14 1,000,000 #1 @user :-) ;-( a_b __ _",
    "tags_only": "<br /><br /><p></p>",
    "nbsp_entities_only": "&nbsp;&nbsp; &#160;",
    "very_long": {"repeat": LONG_PIECE, "times": 3000},
}


def case_text(case):
    return case["repeat"] * case["times"] if isinstance(case, dict) else case


def pipeline():
    vectorize = (
        "ngram: [1, 2], min_df: 1, max_df: 1.0, lowercase: false, binary: false, "
        "sublinear_tf: false, use_idf: false, l2_norm: false"
    )
    return f"""name: textfixture
stages:
  load:
    uses: load
    with: {{path: data/reviews.jsonl, format: jsonl, text_column: text, label_column: label,
           id_column: id, group_column: movie, out: data/reviews.parquet}}
  clean:
    uses: clean
    needs: [load]
    with: {{lowercase: false, min_chars: 0, dedupe: false, out: data/clean.parquet}}
  clean_lowercase:
    uses: clean
    needs: [load]
    with: {{lowercase: true, min_chars: 0, dedupe: false, out: data/clean_lowercase.parquet}}
  split:
    uses: split
    needs: [load]
    with: {{validation: 0.2, group: movie, out: data/split}}
  words:
    uses: vectorize
    needs: [split]
    with: {{{vectorize}, out: data/words}}
  words_and_marks:
    uses: vectorize
    needs: [split]
    with: {{{vectorize}, token_pattern: {json.dumps(WORDS_AND_MARKS)}, out: data/words_and_marks}}
  tune:
    uses: tune
    needs: [words]
    with: {{models: [{{model: logreg, C: [1]}}], folds: 2, out: data/tune}}
  train:
    uses: train
    needs: [words, tune]
    with: {{out: data/model}}
  export:
    uses: export
    needs: [train]
    with: {{out: models/tfidf}}
"""


def reviews():
    """The cases, all of one movie (the largest group, which the split always keeps for training),
    and a few plain reviews of other movies for the validation part."""
    rows = []
    for i, (name, case) in enumerate(CASES.items()):
        rows.append({"id": name, "text": case_text(case), "label": ["negative", "positive"][i % 2], "movie": "cases"})
    for i in range(8):
        label = ["negative", "positive"][i % 2]
        rows.append(
            {"id": f"plain{i}", "text": f"A plain {label} review, number {i}.", "label": label, "movie": f"m{i}"}
        )
    return rows


def read_csr(path):
    raw = path.read_bytes()
    assert raw[:8] == b"SFCSR01\n", path
    rows, _cols, nnz = np.frombuffer(raw, "<u8", 3, 8)
    at = 32
    indptr = np.frombuffer(raw, "<u8", rows + 1, at)
    at += 8 * (rows + 1)
    indices = np.frombuffer(raw, "<u4", nnz, at)
    at += 4 * nnz
    values = np.frombuffer(raw, "<f4", nnz, at)
    return indptr, indices, values


def token_counts(vectorizer, row):
    """The counts of the tokens and pairs of tokens of row `row` of the training part."""
    names = [""] + (vectorizer / "unigrams.txt").read_text(encoding="utf-8").split("\n")[:-1]
    keys = np.fromfile(vectorizer / "ngrams.bin", dtype="<u8")
    indptr, indices, values = read_csr(vectorizer / "train.csr")
    unigrams, bigrams = {}, {}
    for column, value in zip(
        indices[indptr[row] : indptr[row + 1]], values[indptr[row] : indptr[row + 1]], strict=True
    ):
        key = int(keys[column])
        ids = [(key >> (21 * j)) & ((1 << 21) - 1) for j in range(3)]
        tokens = [names[i] for i in ids if i]
        assert value == int(value), (vectorizer, row, value)
        if len(tokens) == 1:
            unigrams[tokens[0]] = int(value)
        else:
            bigrams[" ".join(tokens)] = int(value)
    return {"unigrams": dict(sorted(unigrams.items())), "bigrams": dict(sorted(bigrams.items()))}


def generate(sentiflow):
    with tempfile.TemporaryDirectory(prefix="sentiflow-text-fixture-") as tmp:
        project = Path(tmp)
        (project / "pipelines").mkdir()
        (project / "data").mkdir()
        (project / "pipelines" / "textfixture.yaml").write_text(pipeline())
        with open(project / "data" / "reviews.jsonl", "w", encoding="utf-8") as f:
            for row in reviews():
                f.write(json.dumps(row) + "\n")
        subprocess.run([sentiflow, "run", "-q", "pipelines/textfixture.yaml"], cwd=project, check=True)

        def texts(path):
            table = pq.read_table(project / "data" / path, columns=["id", "text"]).to_pydict()
            return dict(zip(table["id"], table["text"], strict=True))

        normalized, lowercase = texts("clean.parquet"), texts("clean_lowercase.parquet")
        train_ids = pq.read_table(project / "data" / "split" / "train.parquet", columns=["id"]).column("id")
        row_of = {id_: i for i, id_ in enumerate(train_ids.to_pylist())}
        cases = []
        for name, case in CASES.items():
            if name not in row_of:
                sys.exit(f"review {name} is not in the training part: change the split")
            entry = {"name": name}
            if isinstance(case, dict):
                entry["repeat"], entry["times"] = case["repeat"], case["times"]
                # Long texts are kept by their hash.
                entry["normalized_sha256"] = hashlib.sha256(normalized[name].encode()).hexdigest()
                entry["normalized_lowercase_sha256"] = hashlib.sha256(lowercase[name].encode()).hexdigest()
            else:
                entry["text"] = case
                entry["normalized"] = normalized[name]
                entry["normalized_lowercase"] = lowercase[name]
            entry["tokens"] = {p: token_counts(project / "data" / p, row_of[name]) for p in PATTERNS}
            cases.append(entry)
        version = subprocess.run([sentiflow, "--version"], capture_output=True, text=True).stdout.strip()
        rules = json.loads((project / "models" / "tfidf" / "text_rules.json").read_text(encoding="utf-8"))
    made = {
        "generated_by": f"tests/python/make_text_fixture.py with {version}",
        "token_patterns": PATTERNS,
        "cases": cases,
    }
    return made, rules


def main(argv):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    target = Path(os.environ.get("CARGO_TARGET_DIR", ROOT / "target"))
    ap.add_argument("--sentiflow", default=os.environ.get("SENTIFLOW_BIN", str(target / "release" / "sentiflow")))
    ap.add_argument("--check", action="store_true", help="compare with the committed fixtures instead of writing")
    args = ap.parse_args(argv)
    made, rules = generate(args.sentiflow)
    files = {
        FIXTURES / "text_cases.json": json.dumps(made, indent=1, ensure_ascii=False) + "\n",
        FIXTURES / "text_rules.json": json.dumps(rules, separators=(",", ":"), sort_keys=True) + "\n",
    }
    if args.check:
        # The binary's version line may differ; what it says about the texts may not.
        def content(text):
            return {**json.loads(text), "generated_by": None}

        stale = [
            path.name for path, text in files.items() if content(path.read_text(encoding="utf-8")) != content(text)
        ]
        if stale:
            sys.exit(f"{', '.join(stale)}: not what {args.sentiflow} says; run {Path(__file__).name} to update")
        print("the text fixtures are what the binary says")
        return
    FIXTURES.mkdir(exist_ok=True)
    for path, text in files.items():
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:])
