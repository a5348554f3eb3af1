#!/usr/bin/env bash
# The shared MLflow tracking server for a cluster: PostgreSQL backend, proxied artifacts.
# Settings come from the environment (see README.md); the server runs in the foreground.
set -euo pipefail
: "${MLFLOW_BACKEND_URI:?set MLFLOW_BACKEND_URI, e.g. postgresql://mlflow:PASSWORD@db-host:5432/mlflow}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, a shared folder or an s3://, gs:// URI}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
WORKERS="${MLFLOW_WORKERS:-4}"
args=(server --backend-store-uri "$MLFLOW_BACKEND_URI" --artifacts-destination "$MLFLOW_ARTIFACTS"
      --serve-artifacts --host "$HOST" --port "$PORT" --workers "$WORKERS")
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec "${PYTHON:-python3}" -m mlflow "${args[@]}"
