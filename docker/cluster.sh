#!/usr/bin/env bash
# `make cluster-train` and `make cluster-sweep` (docs/scaling-out.md, "A cluster on the team stack"): start
# WORKERS one-off containers of the compose profile `cluster` on the running stack, show their output (each
# line after its container's role and index), wait for all of them, and exit with the status of the first
# one (by index) that failed, 0 when none did.
#
#   docker/cluster.sh train ARGS...   containers of `cluster-worker`: one multi_worker training, one run
#   docker/cluster.sh sweep ARGS...   containers of `cluster-sweep`: one Optuna study, one parent run
#
# ARGS go to every container's `train` / `sweep` command alike. A `--dataset` naming a file on this machine
# is mounted into every container (read-only, at the same absolute path) and passed as that path. COMPOSE is how
# Docker Compose is called (default `docker compose`; add --project-name, --env-file, --file for another
# stack). Ctrl-C stops the containers; they are removed at the end in any case.
set -euo pipefail

role=${1:-}
case "$role" in
    train) service=cluster-worker prefix=worker ;;
    sweep) service=cluster-sweep prefix=sweep ;;
    *) echo "usage: docker/cluster.sh train|sweep ARGS..." >&2; exit 2 ;;
esac
shift
workers=${WORKERS:-2}
if ! [[ "$workers" =~ ^[1-9][0-9]*$ ]]; then
    echo "error: WORKERS=$workers is not a number of containers (1 or more)" >&2
    exit 2
fi
read -r -a compose <<< "${COMPOSE:-docker compose}"

arguments=() mounts=()
while (($#)); do
    if [ "$1" = --dataset ] && (($# > 1)) && [ -f "$2" ]; then
        file="$(cd "$(dirname "$2")" && pwd)/$(basename "$2")"
        mounts=(--volume "$file:$file:ro")
        arguments+=(--dataset "$file")
        shift 2
    else
        arguments+=("$1")
        shift
    fi
done

containers=()
remove() { ((${#containers[@]} == 0)) || docker rm --force "${containers[@]}" > /dev/null 2>&1 || true; }
trap remove EXIT
trap 'docker stop --time 10 "${containers[@]}" > /dev/null 2>&1 || true' INT TERM
for ((index = 0; index < workers; index++)); do
    # WORKER_INDEX and WORKERS reach the container's environment and its DNS alias (docker-compose.yml)
    started=$(WORKER_INDEX=$index WORKERS=$workers "${compose[@]}" --progress quiet --profile cluster run --detach --use-aliases \
        "${mounts[@]}" "$service" "${arguments[@]}")
    containers+=("$(tail -n 1 <<< "$started")")
done
for index in "${!containers[@]}"; do
    docker logs --follow "${containers[$index]}" 2>&1 | sed -u "s/^/[$prefix $index] /" &
done
status=0
for container in "${containers[@]}"; do
    code=$(docker wait "$container" || echo 1)
    if [ "$status" = 0 ] && [ "$code" != 0 ]; then
        status=$code
    fi
done
wait  # the log followers end with their containers
exit "$status"
