#!/usr/bin/env bash
# Screenshots of the MLflow UI showing a sentiflow run: starts an MLflow server (from the
# project's Python environment) on a scratch store, runs pipelines/quickstart.yaml with tracking,
# and photographs, with headless Chromium (Debian package `chromium`), the pipeline run's page
# (source, datasets, logged model, tuning trials as child runs, tags, registered model), its
# logged model's page and two of its plots.
#
#   scripts/mlflow-screenshot.sh [OUT_DIR]     (default: docs/src/screenshots, where the book shows them)
set -euo pipefail
cd "$(dirname "$0")/.."
out="$(mkdir -p "${1:-docs/src/screenshots}" && cd "${1:-docs/src/screenshots}" && pwd)"
command -v chromium >/dev/null || { echo "error: chromium is not installed (apt-get install chromium)" >&2; exit 1; }
venv="$(scripts/setup-python)"
cargo build --release --quiet
sentiflow="$PWD/${CARGO_TARGET_DIR:-target}/release/sentiflow"
work="$(mktemp -d)"
port=15055
"$venv/bin/mlflow" server --host 127.0.0.1 --port "$port" --workers 1 \
  --backend-store-uri "sqlite:///$work/mlflow.db" --artifacts-destination "$work/artifacts" >"$work/mlflow.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null; pkill -f "port $port" 2>/dev/null; rm -rf "$work"' EXIT
for _ in $(seq 1 120); do curl -fsS -o /dev/null "http://127.0.0.1:$port/health" && break; sleep 1; done

mkdir -p "$work/project/pipelines" "$work/project/tests/fixtures"
cp pipelines/quickstart.yaml "$work/project/pipelines/"
cp tests/fixtures/imdb_sample.tar.gz "$work/project/tests/fixtures/"
(cd "$work/project" && MLFLOW_TRACKING_URI="http://127.0.0.1:$port" "$sentiflow" run pipelines/quickstart.yaml)

ids=$("$venv/bin/python" - "$port" <<'PY'
import sys
from mlflow.tracking import MlflowClient
c = MlflowClient(f"http://127.0.0.1:{sys.argv[1]}")
exp = c.get_experiment_by_name("quickstart")
run = [r for r in c.search_runs([exp.experiment_id]) if "mlflow.parentRunId" not in r.data.tags][0]
model = c.search_logged_models(experiment_ids=[exp.experiment_id])[0]
print(exp.experiment_id, run.info.run_id, model.model_id)
PY
)
read -r exp run model <<<"$ids"
shot() {  # file url
  chromium --headless --no-sandbox --disable-gpu --disable-quic --no-first-run --hide-scrollbars \
    --disable-background-networking --disable-component-update --disable-sync \
    --user-data-dir="$work/chrome" --window-size=1500,1000 --virtual-time-budget=15000 \
    --screenshot="$out/$1" "$2" 2>/dev/null
  echo "wrote $out/$1"
}
base="http://127.0.0.1:$port/#/experiments/$exp"
shot mlflow-run-overview.png "$base/runs/$run"
shot mlflow-logged-model.png "$base/models/$model"
shot mlflow-plot-confusion.png "$base/runs/$run/artifacts/train/confusion_matrix.png"
shot mlflow-plot-tuning.png "$base/runs/$run/artifacts/tune/score_vs_C.png"
