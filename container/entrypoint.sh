#!/bin/sh
# Starts the MLflow tracking server and UI (:5000, store on the volume) beside the sentiflow API
# (:8080; SENTIFLOW_ADDR and SENTIFLOW_MLFLOW_PORT move them); the container stops when the API
# stops.
set -eu
port="${SENTIFLOW_MLFLOW_PORT:-5000}"
export MLFLOW_TRACKING_URI="http://127.0.0.1:$port"
mkdir -p /data/data /data/models /data/reports /data/cache /data/mlflow/artifacts
mlflow server --host 0.0.0.0 --port "$port" \
  --backend-store-uri sqlite:////data/mlflow/mlflow.db \
  --artifacts-destination /data/mlflow/artifacts --serve-artifacts \
  --allowed-hosts '*' >/data/mlflow/server.log 2>&1 &
exec sentiflow serve "$@"
