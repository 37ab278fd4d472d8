# sentiflow: the API on :8080 and the MLflow UI on :5000, with one volume (/data) for the data,
# the cache, the database and the MLflow store. See container/README.md.
#
# Behind a TLS-intercepting proxy, give its CA as a build secret:
#   docker build --secret id=ca,src=/etc/ssl/certs/ca-certificates.crt -t sentiflow .

FROM rust:1-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src src
COPY bench/onnx_latency.rs bench/onnx_latency.rs
# The registry and the build directory are cache mounts: a rebuild after a source change only
# recompiles sentiflow.
RUN --mount=type=secret,id=ca \
    --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    if [ -f /run/secrets/ca ]; then export CARGO_HTTP_CAINFO=/run/secrets/ca; fi; \
    cargo build --release --locked --bin sentiflow \
    && install -s target/release/sentiflow /usr/local/bin/sentiflow

FROM debian:bookworm-slim
RUN apt-get update -qq \
    && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
       ca-certificates curl python3 python3-venv tini \
    && rm -rf /var/lib/apt/lists/*
# MLflow (tracking server and UI) and ONNX Runtime, whose wheel carries libonnxruntime.so; with
# MLflow's PostgreSQL driver and S3 client for its shared set-up (compose.replicas.yaml); and Ray,
# so that the image serves as the worker image of a Ray cluster (KubeRay) running sentiflow's
# stages (docs/src/multi-machine.md#kubernetes).
COPY requirements-dev.txt stages/bert/requirements.txt /tmp/req/
RUN --mount=type=secret,id=ca \
    if [ -f /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi; \
    python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --disable-pip-version-check \
       "$(grep '^mlflow==' /tmp/req/requirements-dev.txt)" "$(grep '^onnxruntime==' /tmp/req/requirements.txt)" \
       "$(grep '^ray\[default\]==' /tmp/req/requirements-dev.txt)" \
       psycopg2-binary==2.9.13 boto3==1.44.8 \
    && rm -rf /tmp/req
RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin sentiflow \
    && mkdir -p /data /app \
    && chown sentiflow:sentiflow /data /app
COPY --from=build /usr/local/bin/sentiflow /usr/local/bin/sentiflow
COPY --chown=sentiflow:sentiflow pipelines /app/pipelines
COPY --chown=sentiflow:sentiflow tests/fixtures/imdb_sample.tar.gz /app/tests/fixtures/imdb_sample.tar.gz
COPY container/entrypoint.sh /usr/local/bin/sentiflow-container
# Pipelines write data/, models/ and reports/ under the project root: keep them on the volume,
# which SENTIFLOW_OUTPUT_DIRS allows outputs to reach through these links.
RUN for d in data models reports; do ln -s /data/$d /app/$d; done

USER sentiflow
WORKDIR /app
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    SENTIFLOW_ADDR=0.0.0.0:8080 \
    SENTIFLOW_DB=/data/sentiflow.db \
    SENTIFLOW_CACHE_DIR=/data/cache \
    SENTIFLOW_OUTPUT_DIRS=/data/data:/data/models:/data/reports
VOLUME /data
EXPOSE 8080 5000
HEALTHCHECK --interval=15s --timeout=3s --start-period=30s \
    CMD curl -fsS "http://127.0.0.1:${SENTIFLOW_ADDR##*:}/health" \
        && curl -fsS -o /dev/null "http://127.0.0.1:${SENTIFLOW_MLFLOW_PORT:-5000}/health" || exit 1
ENTRYPOINT ["tini", "--", "sentiflow-container"]
