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
#                                fine for a team's sweeps) or postgresql://ROLE:PW@HOST/mlflow (durable,
#                                several servers). ROLE is the server's OWN database role, made by
#                                cluster/mlflow-db-role.sql: it owns the mlflow and mlflow_auth databases
#                                and nothing else (no superuser, no CREATEDB/CREATEROLE). Never the
#                                master user: this URI sits in the server's environment, and the master
#                                password would open every database of the instance. The script refuses
#                                (exit 2) a PostgreSQL URI whose user is one of MLFLOW_DB_ADMIN_USERS
#                                (default: postgres pgmaster rdsadmin cloudsqlsuperuser azure_superuser;
#                                put your instance's master user name there if it is another).
#   MLFLOW_ARTIFACTS_DESTINATION where artifacts are stored: a folder on a shared filesystem, or
#                                s3://, gs://, wasbs:// (the server needs the cloud credentials; the
#                                clients do not: they upload through the server, --serve-artifacts)
#   MLFLOW_ALLOWED_HOSTS         Host headers answered when not on loopback (default: MLFLOW_HOST,
#                                127.0.0.1, localhost -- the names clients and tunnels use)
#   MLFLOW_WORKERS               server worker processes (default 1 with SQLite, which has one
#                                writer at a time; 4 with PostgreSQL)
#   MLFLOW_AUTH=1                MLflow's basic-auth app (--app-name basic-auth): every request needs a
#                                user and password; clients send MLFLOW_TRACKING_USERNAME/PASSWORD.
#                                REQUIRED for any MLFLOW_HOST other than loopback.
#   MLFLOW_AUTH_ADMIN_PASSWORD   with MLFLOW_AUTH=1: the admin's password (required; MLflow creates the
#                                admin with it on first start). MLFLOW_AUTH_ADMIN_USERNAME: default admin
#   MLFLOW_AUTH_DATABASE_URI     with MLFLOW_AUTH=1: the users/permissions store (default
#                                sqlite:///$STATE/basic_auth.db; postgresql://... beside the backend store)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  with MLFLOW_AUTH=1: CSRF key (default: random per start; set the
#                                same one on every replica when several servers share the stores)
#   Basic auth needs MLflow's auth extra (pip install 'mlflow[auth]': Flask-WTF), in the image.
#
# Exposing it safely. Without authentication anyone who can reach MLflow can read and delete every
# run, so this script serves without it only on loopback (127.0.0.1, ::1, localhost): reach it
# through an SSH tunnel (`ssh -L 5000:127.0.0.1:5000 head`) or put an authenticating proxy (TLS) on
# the same machine in front of it. When the cluster's nodes must reach it (trials on worker nodes log
# to it), bind it to the head's *private* address (MLFLOW_HOST=10.0.1.23) WITH MLFLOW_AUTH=1 -- the
# script refuses otherwise (exit 2) -- inside a VPC whose security group admits only the cluster's
# nodes, never 0.0.0.0 on a public interface, and tunnel to that address (`ssh -L 5000:10.0.1.23:5000
# head`). With a non-loopback MLFLOW_HOST the script also sets --allowed-hosts to that host, so
# DNS-rebinding requests with other Host headers are refused. Basic auth sends the password with
# every request: on an untrusted network put TLS in front (an authenticating proxy), or use a tunnel.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MLFLOW_BIN="${MLFLOW_BIN:-}"
if [[ -z "$MLFLOW_BIN" ]]; then
  if [[ -x "$HERE/../.venv/bin/mlflow" ]]; then MLFLOW_BIN="$HERE/../.venv/bin/mlflow"; else MLFLOW_BIN="$(command -v mlflow || true)"; fi
fi
if [[ -z "$MLFLOW_BIN" ]]; then
  echo "mlflow-server.sh: no mlflow found (not in $HERE/../.venv/bin, not on PATH); set MLFLOW_BIN=/path/to/mlflow" >&2
  exit 2
fi

# MLflow 3's server would start seven Huey job consumers (GenAI jobs: prompt optimisation,
# scorers, trace roll-ups), each a Python importing MLflow; conmim uses none. Set it to true to have them.
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
HOST="${MLFLOW_HOST:-127.0.0.1}"
PORT="${MLFLOW_PORT:-5000}"
STATE="$(mkdir -p "${CONMIM_MLFLOW_DIR:-./mlflow-server}" && cd "${CONMIM_MLFLOW_DIR:-./mlflow-server}" && pwd)"
BACKEND="${MLFLOW_BACKEND_STORE_URI:-sqlite:///$STATE/mlflow.db}"          # absolute path: four slashes
ARTIFACTS="${MLFLOW_ARTIFACTS_DESTINATION:-$STATE/artifacts}"

args=(server --backend-store-uri "$BACKEND" --artifacts-destination "$ARTIFACTS" --serve-artifacts
      --host "$HOST" --port "$PORT")
if [[ "$BACKEND" == sqlite:* ]]; then args+=(--workers "${MLFLOW_WORKERS:-1}"); else args+=(--workers "${MLFLOW_WORKERS:-4}"); fi
loopback=0
case "$HOST" in 127.*|localhost|::1|"[::1]") loopback=1 ;; esac
auth="${MLFLOW_AUTH:-}"
if [[ -n "$auth" && "$auth" != 1 && "$auth" != 0 ]]; then
  echo "mlflow-server: MLFLOW_AUTH=$auth: use MLFLOW_AUTH=1 (basic auth) or leave it unset" >&2; exit 2
fi
# A PostgreSQL store is opened as the server's own role, never as the instance's master user.
admin_users="${MLFLOW_DB_ADMIN_USERS:-postgres pgmaster rdsadmin cloudsqlsuperuser azure_superuser}"
for var in MLFLOW_BACKEND_STORE_URI MLFLOW_AUTH_DATABASE_URI; do
  uri="${!var:-}"
  [[ "$uri" == postgres* ]] || continue
  rest="${uri#*://}"
  user=""
  if [[ "$rest" == *@* ]]; then user="${rest%%@*}"; user="${user%%:*}"; fi
  if [[ -z "$user" ]]; then
    echo "mlflow-server: $var names no database user; give the server's own role (cluster/mlflow-db-role.sql)," \
         "postgresql://mlflow_server:PASSWORD@HOST:5432/mlflow, not the master user." >&2
    exit 2
  fi
  for admin in $admin_users; do
    if [[ "$user" == "$admin" ]]; then
      echo "mlflow-server: $var logs in as '$user', an administrator of the database instance" \
           "(MLFLOW_DB_ADMIN_USERS). The server keeps this URI in its environment; give it its own role," \
           "which owns the mlflow and mlflow_auth databases and nothing else: cluster/mlflow-db-role.sql." >&2
      exit 2
    fi
  done
done
if [[ $loopback == 0 && "$auth" != 1 ]]; then
  echo "mlflow-server: refusing to serve MLflow on $HOST without authentication: anyone who reaches it could" \
       "read and delete every run. Set MLFLOW_AUTH=1 (basic auth, with MLFLOW_AUTH_ADMIN_PASSWORD) or bind to" \
       "127.0.0.1 and reach it through a tunnel or an authenticating proxy (see the header of $0)." >&2
  exit 2
fi
if [[ "$auth" == 1 ]]; then
  if [[ -z "${MLFLOW_AUTH_ADMIN_PASSWORD:-}" || "${MLFLOW_AUTH_ADMIN_PASSWORD}" == password1234 ]]; then
    echo "mlflow-server: MLFLOW_AUTH=1 needs MLFLOW_AUTH_ADMIN_PASSWORD (a strong password, e.g." \
         "python -c 'import secrets; print(secrets.token_urlsafe(24))'); clients log in with" \
         "MLFLOW_TRACKING_USERNAME=${MLFLOW_AUTH_ADMIN_USERNAME:-admin} and MLFLOW_TRACKING_PASSWORD." >&2
    exit 2
  fi
  export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}" MLFLOW_AUTH_ADMIN_PASSWORD
  # the auth app's CSRF key: give the same MLFLOW_FLASK_SERVER_SECRET_KEY to every replica of a
  # multi-server deployment; one server gets a random one per start
  export MLFLOW_FLASK_SERVER_SECRET_KEY="${MLFLOW_FLASK_SERVER_SECRET_KEY:-$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')}"
  if [[ -z "${MLFLOW_AUTH_CONFIG_PATH:-}" ]]; then
    # The auth app's settings; may hold a database password, so in a private folder of this
    # machine, not in the (shared) state folder. configparser needs '%' doubled.
    conf_dir="$(mktemp -d "${TMPDIR:-/tmp}/mlflow-auth.XXXXXX")"
    chmod 700 "$conf_dir"
    auth_db="${MLFLOW_AUTH_DATABASE_URI:-sqlite:///$STATE/basic_auth.db}"
    ( umask 077
      printf '[mlflow]\ndefault_permission = READ\ndatabase_uri = %s\nadmin_username = %s\nauthorization_function = %s\n' \
        "${auth_db//\%/%%}" "$MLFLOW_AUTH_ADMIN_USERNAME" "mlflow.server.auth:authenticate_request_basic_auth" \
        > "$conf_dir/basic_auth.ini" )
    export MLFLOW_AUTH_CONFIG_PATH="$conf_dir/basic_auth.ini"
  fi
  args+=(--app-name basic-auth)
fi
if [[ $loopback == 0 ]]; then
  echo "mlflow-server: binding to $HOST (basic auth on) -- make sure only the cluster's nodes can reach it" >&2
  args+=(--allowed-hosts "${MLFLOW_ALLOWED_HOSTS:-$HOST,$HOST:$PORT,127.0.0.1,127.0.0.1:$PORT,localhost,localhost:$PORT}")
fi

echo "MLflow tracking server: http://$HOST:$PORT  (runs: ${BACKEND%%://*}://..., artifacts: $ARTIFACTS," \
     "auth: $([[ "$auth" == 1 ]] && echo "basic, admin ${MLFLOW_AUTH_ADMIN_USERNAME}" || echo "none, loopback only"))" >&2
exec "$MLFLOW_BIN" "${args[@]}"
