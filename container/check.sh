#!/usr/bin/env bash
# Builds the container image with podman, starts a Ray node in it (the image is a Ray worker
# image too), starts it, trains the quickstart pipeline through
# `POST /training`, gets a prediction, and loads the MLflow UI page and its REST API from the
# container. Needs podman: ../shared/tools/podman-setup.sh installs it (SENTIFLOW_PODMAN_TOOLS
# names another directory holding podman-setup.sh and a `podman` wrapper).
set -euo pipefail
cd "$(dirname "$0")/.."
tools="${SENTIFLOW_PODMAN_TOOLS:-../shared/tools}"
"$tools/podman-setup.sh"
podman="$tools/podman"
api_port=18080 ui_port=15000 name=sentiflow-check volume=sentiflow-check-data
api="http://127.0.0.1:$api_port" ui="http://127.0.0.1:$ui_port"

cleanup() { "$podman" rm -f "$name" >/dev/null 2>&1 || true; "$podman" volume rm -f "$volume" >/dev/null 2>&1 || true; }
trap cleanup EXIT
cleanup

secret=()
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  # The host's CA bundle, for a TLS-intercepting proxy between the build and the registries.
  secret=(--secret id=ca,src=/etc/ssl/certs/ca-certificates.crt)
fi
echo "== podman build"
start=$(date +%s)
# Docker's image format: OCI images drop HEALTHCHECK.
"$podman" build --format docker "${secret[@]}" -t sentiflow .
echo "built in $(($(date +%s) - start)) s; image size: $("$podman" image inspect sentiflow --format '{{.Size}}' | awk '{printf "%.0f MB", $1 / 1e6}')"

echo "== the image as a Ray worker: a Ray node starts in it, beside sentiflow"
"$podman" run --rm --entrypoint sh sentiflow -c \
  'ray start --head --num-cpus 1 --include-dashboard false --disable-usage-stats >/dev/null \
   && ray status | grep CPU && sentiflow --version && ray stop >/dev/null'

echo "== podman run"
"$podman" run -d --name "$name" -v "$volume:/data" \
  -e SENTIFLOW_ADDR="0.0.0.0:$api_port" -e SENTIFLOW_MLFLOW_PORT="$ui_port" sentiflow >/dev/null
wait_for() {
  for _ in $(seq 1 120); do curl -fs -o /dev/null "$1" && return 0; sleep 1; done
  echo "error: $1 did not answer" >&2; "$podman" logs "$name" >&2; exit 1
}
wait_for "$api/health"
wait_for "$ui/health"
echo "user in the container: $("$podman" exec "$name" id -un); health: $(curl -fsS "$api/health")"

key=$("$podman" exec "$name" sentiflow keys create --role admin --label check)
auth=(-H "Authorization: Bearer $key" -H "Content-Type: application/json")

echo "== POST /training"
run=$(curl -fsS "${auth[@]}" -d '{"pipeline": "quickstart"}' "$api/training")
echo "$run"
id=$(echo "$run" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')
for _ in $(seq 1 120); do
  status=$(curl -fsS "${auth[@]}" "$api/training/$id" | python3 -c 'import json,sys; print(json.load(sys.stdin)["status"])')
  [ "$status" = running ] || [ "$status" = queued ] || break
  sleep 1
done
echo "training $id: $status"
[ "$status" = succeeded ] || { curl -fsS "${auth[@]}" "$api/training/$id/logs"; exit 1; }
curl -fsS "${auth[@]}" "$api/training/$id/logs" | python3 -c '
import json, sys
for line in json.load(sys.stdin)["lines"][-4:]:
    print("  log:", line if isinstance(line, str) else line.get("line", line))'

echo "== POST /prediction"
curl -fsS "${auth[@]}" -d '{"text": "A wonderful, moving film with a brilliant cast."}' "$api/prediction"
echo

echo "== MLflow UI and REST API"
title=$(curl -fsS "$ui/" | grep -o '<title>[^<]*</title>')
echo "GET $ui/ -> $title"
curl -fsS -X POST -H "Content-Type: application/json" \
  -d '{"experiment_ids": [], "max_results": 50}' "$ui/api/2.0/mlflow/experiments/search" >/dev/null
python3 - "$ui" <<'PY'
import json, sys, urllib.request
ui = sys.argv[1]
def get(path):
    return json.load(urllib.request.urlopen(ui + path))
exp = get("/api/2.0/mlflow/experiments/get-by-name?experiment_name=quickstart")["experiment"]
req = urllib.request.Request(ui + "/api/2.0/mlflow/runs/search", data=json.dumps(
    {"experiment_ids": [exp["experiment_id"]], "max_results": 100}).encode(), headers={"Content-Type": "application/json"})
runs = json.load(urllib.request.urlopen(req))["runs"]
parents = [r for r in runs if not any(t["key"] == "mlflow.parentRunId" for t in r["data"].get("tags", []))]
print(f"MLflow experiment quickstart: {len(parents)} pipeline run(s), {len(runs) - len(parents)} trial run(s)")
run = parents[0]
arts = get(f"/api/2.0/mlflow/artifacts/list?run_id={run['info']['run_id']}&path=train")["files"]
print("  artifacts under train/:", ", ".join(sorted(a["path"] for a in arts)))
acc = [m["value"] for m in run["data"]["metrics"] if m["key"] == "train.accuracy"]
print(f"  train.accuracy {acc[0]:.4f}, status {run['info']['status']}")
PY
echo "== healthcheck: $("$podman" healthcheck run "$name" >/dev/null 2>&1 && echo healthy || echo "not run by this podman")"
echo "container check passed"
