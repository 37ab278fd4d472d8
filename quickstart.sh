#!/usr/bin/env bash
# The main job: builds sentiflow, sets up the Python environment of the BERT stages, trains the
# IMDB pipeline (pipelines/imdb.yaml: TF-IDF and MiniLM-L6 branches), scores two reviews with
# both exported models and serves them over HTTP (Ctrl-C stops the server).
#
#   ./quickstart.sh [PATH/TO/aclImdb_v1.tar.gz]      (or SENTIFLOW_IMDB=PATH ./quickstart.sh)
#
# Without a path it uses data/aclImdb_v1.tar.gz, downloading the official archive there when it
# is missing.
set -euo pipefail

archive="${1:-${SENTIFLOW_IMDB:-}}"
if [ -n "$archive" ]; then
  if [ ! -f "$archive" ]; then
    echo "error: $archive: no such file (give the IMDB archive, e.g. aclImdb_v1.tar.gz)" >&2
    exit 2
  fi
  archive="$(cd "$(dirname "$archive")" && pwd)/$(basename "$archive")"
fi
cd "$(dirname "$0")"

cargo build --release --quiet
sentiflow="${CARGO_TARGET_DIR:-target}/release/sentiflow"
venv="$(scripts/setup-python)"
# The BERT stages' interpreter; ONNX Runtime's library comes from the same environment's wheel.
export SENTIFLOW_PYTHON="$venv/bin/python" VIRTUAL_ENV="$venv"

set_data=()
if [ -n "$archive" ]; then
  echo "Using the IMDB archive at $archive"
  set_data=(--set "data=$archive")
elif [ -f data/aclImdb_v1.tar.gz ]; then
  echo "Using the IMDB archive at data/aclImdb_v1.tar.gz"
else
  echo "No IMDB archive given (argument or SENTIFLOW_IMDB) and none at data/aclImdb_v1.tar.gz:"
  echo "downloading the official archive."
fi

if ! "$sentiflow" run pipelines/imdb.yaml "${set_data[@]}"; then
  if [ -z "$archive" ]; then
    echo "The IMDB archive could not be had. Give a local copy: ./quickstart.sh PATH/TO/aclImdb_v1.tar.gz" >&2
    echo "(or SENTIFLOW_IMDB=PATH), or put it at data/aclImdb_v1.tar.gz." >&2
  fi
  exit 1
fi
for model in tfidf bert; do
  echo
  echo "Predictions of models/$model:"
  "$sentiflow" predict --model "models/$model" \
    "One of the best films I have seen in years: moving, funny and beautifully acted." \
    "A boring, badly written mess. I want my two hours back."
done

key=$("$sentiflow" keys create --role admin --label quickstart)
addr="${SENTIFLOW_ADDR:-127.0.0.1:8080}"
echo
echo "Serving models/tfidf and models/bert on http://$addr with a new admin key (stored hashed in sentiflow.db). Try:"
echo "  curl -s http://$addr/prediction -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' -d '{\"text\": \"A wonderful film.\"}'"
echo "  curl -s http://$addr/prediction -H 'Authorization: Bearer $key' -H 'Content-Type: application/json' -d '{\"text\": \"A wonderful film.\", \"model\": \"bert\"}'"
echo "  curl -s http://$addr/best_model_parameter -H 'Authorization: Bearer $key'"
exec "$sentiflow" serve --addr "$addr"
