#!/usr/bin/env bash
# Checks /openapi.json against the running server with schemathesis (PyPI): every documented
# operation is called with generated valid and invalid inputs, and each response must match the
# document (status codes, content types, response bodies against their schemas) and never be a
# server error.
#
#   scripts/check-openapi.sh          (needs `.venv/bin/pip install schemathesis` and a release build)
#
# Use Python 3.12 or later for schemathesis: under 3.11 its coverage phase can stop with CPython's
# "AST constructor recursion depth mismatch" while describing a generated body.
set -euo pipefail
cd "$(dirname "$0")/.."
sentiflow=$(realpath "${SENTIFLOW_BIN:-target/release/sentiflow}")
schemathesis=${SCHEMATHESIS:-.venv/bin/schemathesis}
[ -x "$schemathesis" ] || { echo "error: $schemathesis not found: .venv/bin/pip install schemathesis" >&2; exit 2; }

work=$(mktemp -d)
trap 'kill ${server:-} 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"' EXIT
mkdir -p "$work/pipelines" "$work/tests/fixtures"
cp pipelines/quickstart.yaml "$work/pipelines/"
cp tests/fixtures/imdb_sample.tar.gz "$work/tests/fixtures/"
(cd "$work" && "$sentiflow" run pipelines/quickstart.yaml >/dev/null 2>&1)
mkdir -p "$work/models" && cp -r "$work/models/quickstart/tfidf" "$work/models/tfidf"
key=$(cd "$work" && "$sentiflow" keys create --role admin 2>/dev/null)

(cd "$work" && exec "$sentiflow" serve --addr 127.0.0.1:18090 --admin-rps 100000 --predict-rps 100000 \
  --auth-fail-limit 0) &
server=$!
for _ in $(seq 50); do curl -fs http://127.0.0.1:18090/health >/dev/null && break; sleep 0.1; done

"$schemathesis" --config-file scripts/schemathesis.toml run http://127.0.0.1:18090/openapi.json \
  --header "Authorization: Bearer $key" \
  --checks all \
  --max-examples 50 \
  --workers 2 \
  "$@"
