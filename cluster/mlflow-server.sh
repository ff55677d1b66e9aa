#!/usr/bin/env bash
# The shared MLflow tracking server for sweeps on a cluster: every trial, on every node, logs to it
# over HTTP, and artifacts (config.yaml, report.md/png) go through it to one artifact store.
#
#   cluster/mlflow-server.sh                 # sqlite:///$STATE/mlflow.db, artifacts in $STATE/artifacts
#   MLFLOW_BACKEND_STORE_URI=postgresql://mlflow@db:5432/mlflow \
#   MLFLOW_ARTIFACTS_DESTINATION=s3://my-bucket/mlflow cluster/mlflow-server.sh
#   then: conmim sweep FILE --address http://127.0.0.1:8265 --set mlflow.tracking_uri=http://HOST:5000 ...
#
# Settings (environment):
#   MLFLOW_HOST                  bind address (default 127.0.0.1: this machine only; see below)
#   MLFLOW_PORT                  (default 5000)
#   CONMIM_MLFLOW_DIR            state folder for the defaults below (default ./mlflow-server)
#   MLFLOW_BACKEND_STORE_URI     runs, params, metrics: sqlite:////abs/path.db (one server process,
#                                fine for a team's sweeps) or postgresql://... (several servers, HA)
#   MLFLOW_ARTIFACTS_DESTINATION where artifacts are stored: a folder on a shared filesystem, or
#                                s3://, gs://, wasbs:// (the server needs the cloud credentials; the
#                                clients do not: they upload through the server, --serve-artifacts)
#   MLFLOW_ALLOWED_HOSTS         Host headers answered when not on loopback (default: MLFLOW_HOST,
#                                127.0.0.1, localhost -- the names clients and tunnels use)
#   MLFLOW_WORKERS               server worker processes (default 1 with SQLite, which has one
#                                writer at a time; 4 with PostgreSQL)
#
# Exposing it safely. MLflow has no authentication unless asked, and anyone who can reach it can
# read and delete every run. Keep the default 127.0.0.1 and reach it through an SSH tunnel
# (`ssh -L 5000:127.0.0.1:5000 head`). When the cluster's nodes must reach it (trials on worker
# nodes log to it), bind it to the head's *private* address (MLFLOW_HOST=10.0.1.23) inside a VPC
# whose security group admits only the cluster's nodes -- never 0.0.0.0 on a public interface --
# and tunnel to that address (`ssh -L 5000:10.0.1.23:5000 head`). Add MLflow's basic auth
# (MLFLOW_AUTH=1: `--app-name basic-auth`, users in basic_auth.ini) or put an authenticating proxy
# (TLS) in front of it for anything wider. With a non-loopback MLFLOW_HOST the script also sets
# --allowed-hosts to that host, so DNS-rebinding requests with other Host headers are refused.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MLFLOW_BIN="${MLFLOW_BIN:-}"
if [[ -z "$MLFLOW_BIN" ]]; then
  if [[ -x "$HERE/../.venv/bin/mlflow" ]]; then MLFLOW_BIN="$HERE/../.venv/bin/mlflow"; else MLFLOW_BIN="$(command -v mlflow)"; fi
fi

HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
STATE="$(mkdir -p "${CONMIM_MLFLOW_DIR:-./mlflow-server}" && cd "${CONMIM_MLFLOW_DIR:-./mlflow-server}" && pwd)"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}"          # absolute path: four slashes
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/artifacts}"

args=(server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
      --host "$HOST" --port "$PORT")
if [[ "$BACKEND" == sqlite:* ]]; then args+=(--workers "${MLFLOW_WORKERS:-1}"); else args+=(--workers "${MLFLOW_WORKERS:-4}"); fi
if [[ "$HOST" != "127.0.0.1" && "$HOST" != "localhost" ]]; then
  echo "mlflow-server: binding to $HOST -- make sure only the cluster's nodes can reach it (see the header)" >&2
  args+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$HOST,$HOST:$PORT,127.0.0.1,127.0.0.1:$PORT,localhost,localhost:$PORT}")
fi
if [[ -n "${MLFLOW_AUTH:-}" ]]; then
  args+=(--app-name basic-auth)
fi

echo "MLflow tracking server: http://$HOST:$PORT  (runs: ${BACKEND%%://*}://..., artifacts: $ARTIFACTS)" >&2
exec "$MLFLOW_BIN" "${args[@]}"
