#!/usr/bin/env bash
# Starts the team's MLflow tracking server: basic-auth on, artifacts proxied (clients never need
# object-store credentials), users and permissions stored beside the runs.
#
# The one start command for every way the server runs: the `mlflow` service of docker-compose.yml
# runs it in the container, and the native launcher (pipeline/tracking/server.py, used by
# `python -m mlflow_project server` and the tests) runs it as a process, so what the tests start
# is what compose starts. Settings come from the environment only:
#
#   MLFLOW_BACKEND_STORE_URI        required  runs, metrics, params: postgresql+psycopg2://... (or sqlite:///...)
#   MLFLOW_ARTIFACTS_DESTINATION    required  where proxied artifacts are kept: s3://BUCKET/ or a local directory
#   MLFLOW_AUTH_ADMIN_USERNAME      required  the admin user, created on the first start against an empty store
#   MLFLOW_AUTH_ADMIN_PASSWORD      required  its password (MLflow reads both; ignored once the admin exists)
#   MLFLOW_FLASK_SERVER_SECRET_KEY  required  the Flask secret for CSRF protection of the sign-up page
#   MLFLOW_AUTH_DATABASE_URI        optional  users and permissions; default: the backend store (one database)
#   MLFLOW_AUTH_DEFAULT_PERMISSION  optional  what a signed-in user may do where nothing else was granted: READ
#   MLFLOW_AUTH_CACHE_TTL_SECONDS   optional  60: a verified (user, password) is trusted for this long per
#                                   worker instead of re-running the PBKDF2 check on every request
#                                   (~3x throughput for training clients); a password change reaches
#                                   the other workers within this time. 0 turns the cache off.
#   MLFLOW_HOST, MLFLOW_PORT        optional  127.0.0.1, 5000 (the container sets 0.0.0.0)
#   MLFLOW_WORKERS                  optional  server worker processes: 1. With more, uvicorn shares a listening
#                                   socket that lacks TCP_NODELAY, and every request on a kept-alive
#                                   connection (all of MLflow's client calls) stalls ~40 ms in Nagle's
#                                   algorithm (measured here: 44 ms instead of 1 ms per request). One
#                                   worker serves concurrent clients on its own threads: it held 128
#                                   trainings at an epoch a second with nothing lost, and two workers did not
#                                   lower p99 there (bench/RESULTS.md, "A team's load on one server").
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION  optional  false: MLflow's job runner (GenAI judges, scorers, trace
#                                   archival) is not used by this project and costs ~1.8 GB and 8 processes
#   MLFLOW_TRAINING_USERNAME        optional  with it, the accounts per job: create-accounts.py (beside this
#                                   script) runs in the background once the server answers and creates or
#                                   updates the training and serving accounts and their grants; then needs
#   MLFLOW_TRAINING_PASSWORD, MLFLOW_SERVING_USERNAME, MLFLOW_SERVING_PASSWORD, MLFLOW_TRAINING_EXPERIMENT,
#   MLFLOW_SERVED_MODEL             (pipeline/tracking/accounts.py says what each account may do)
#   MLFLOW_ACCOUNTS_READY_FILE      optional  $TMPDIR/mlflow-accounts-ready: written once the accounts are set
#                                   up (the compose healthcheck waits for it); removed at each start
#   MLFLOW_READ_ONLY_USERS          optional  comma-separated users whose writes the server app refuses
#                                   (pipeline/tracking/server_app.py); the serving account is added to it
#
# MLflow reads the auth settings from an ini file (MLFLOW_AUTH_CONFIG_PATH); it is written here,
# readable by this user only, into TMPDIR. The last step replaces this shell with `mlflow server`,
# so signals reach the server directly and its process group is the server's.
set -euo pipefail

: "${MLFLOW_BACKEND_STORE_URI:?is required: the backend store, e.g. postgresql+psycopg2://USER:PASSWORD@HOST:5432/DB}"
: "${MLFLOW_ARTIFACTS_DESTINATION:?is required: where artifacts are kept, e.g. s3://mlflow/ or /srv/mlartifacts}"
: "${MLFLOW_AUTH_ADMIN_USERNAME:?is required: the admin user name}"
: "${MLFLOW_AUTH_ADMIN_PASSWORD:?is required: the admin password}"
: "${MLFLOW_FLASK_SERVER_SECRET_KEY:?is required: a long random string}"

auth_database_uri="${MLFLOW_AUTH_DATABASE_URI:-$MLFLOW_BACKEND_STORE_URI}"
default_permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$default_permission" in
    READ | EDIT | MANAGE | NO_PERMISSIONS) ;;
    *)
        echo "MLFLOW_AUTH_DEFAULT_PERMISSION=$default_permission is invalid: allowed are READ, EDIT, MANAGE, NO_PERMISSIONS" >&2
        exit 2
        ;;
esac

auth_cache_ttl="${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}"
case "$auth_cache_ttl" in
    '' | *[!0-9]*)
        echo "MLFLOW_AUTH_CACHE_TTL_SECONDS=$auth_cache_ttl is invalid: allowed is a whole number of seconds" >&2
        exit 2
        ;;
esac

auth_config="$(mktemp "${TMPDIR:-/tmp}/mlflow-basic-auth.XXXXXX")"
# configparser interpolates '%': a URL-encoded password (%40 ...) must be written as '%%'.
cat >"$auth_config" <<INI
[mlflow]
default_permission = ${default_permission}
database_uri = ${auth_database_uri//\%/%%}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_ttl_seconds = ${auth_cache_ttl}
INI
export MLFLOW_AUTH_CONFIG_PATH="$auth_config"
export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"

export MLFLOW_ACCOUNTS_READY_FILE="${MLFLOW_ACCOUNTS_READY_FILE:-${TMPDIR:-/tmp}/mlflow-accounts-ready}"
rm -f "$MLFLOW_ACCOUNTS_READY_FILE"
if [ -n "${MLFLOW_TRAINING_USERNAME:-}" ]; then
    : "${MLFLOW_TRAINING_PASSWORD:?is required with MLFLOW_TRAINING_USERNAME: the password of the training account}"
    : "${MLFLOW_SERVING_USERNAME:?is required with MLFLOW_TRAINING_USERNAME: the user name of the serving account}"
    : "${MLFLOW_SERVING_PASSWORD:?is required with MLFLOW_TRAINING_USERNAME: the password of the serving account}"
    : "${MLFLOW_TRAINING_EXPERIMENT:?is required with MLFLOW_TRAINING_USERNAME: the experiment the trainer records into}"
    : "${MLFLOW_SERVED_MODEL:?is required with MLFLOW_TRAINING_USERNAME: the registered model the serving account reads}"
    # The serving account only reads: the server app refuses its writes.
    export MLFLOW_READ_ONLY_USERS="${MLFLOW_READ_ONLY_USERS:+$MLFLOW_READ_ONLY_USERS,}$MLFLOW_SERVING_USERNAME"
    # In the background, so that the next line can make this process the server (signals reach it
    # directly); it waits for /health itself, and ends when done.
    python "$(dirname "$0")/create-accounts.py" &
fi

exec mlflow server \
    --backend-store-uri "$MLFLOW_BACKEND_STORE_URI" \
    --artifacts-destination "$MLFLOW_ARTIFACTS_DESTINATION" \
    --serve-artifacts \
    --app-name proxied-basic-auth \
    --host "${MLFLOW_HOST:-127.0.0.1}" \
    --port "${MLFLOW_PORT:-5000}" \
    --workers "${MLFLOW_WORKERS:-1}"
