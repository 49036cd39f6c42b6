"""The cluster on the team stack, measured: what a real network between containers costs a training, and what
more sweep containers buy (bench/RESULTS.md, "The cluster on the team stack").

With the stack up and a client set up as docs/team-server.md says (MLFLOW_TRACKING_URI, _USERNAME, _PASSWORD,
MLFLOW_TRACKING_SERVER_CERT_PATH), and COMPOSE as for docker/cluster.sh when the stack is not the default one:

    .venv/bin/python bench/cluster.py --dataset ../shared/data/mnist-10k.npz --epochs 5 --grid-epochs 3

1. Per epoch, the same training (`--epochs`, early stopping and the target off): `default` in one container,
   `multi_worker` with 1 container, and `multi_worker` over 2 containers (`make cluster-train WORKERS=2`): the
   median of the run's `epoch_seconds` (the chief's) and of `slowest_worker_epoch_seconds`, and the fit time.
2. The same sweep (a grid of 6 points, `--grid-epochs` each) with 1, 2 and 3 containers (`make cluster-sweep`, a
   new study each): the command's wall time, containers' start-up included.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

PROJECT_DIR = Path(__file__).resolve().parents[1]
TRAINING_ARGS = "--target-accuracy 0 --es-patience 50 --lr-patience 50"
GRID = "--learning-rate 1e-3,3e-3 --dropout 0.0,0.2,0.4"


def _run(command: list[str]) -> tuple[str, float]:
    started = time.perf_counter()
    result = subprocess.run(command, cwd=PROJECT_DIR, capture_output=True, text=True, timeout=3600)
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{' '.join(command[:4])}... failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result.stdout, seconds


def _make(target: str, **variables: str) -> tuple[str, float]:
    return _run(["make", "--no-print-directory", target, *(f"{name}={value}" for name, value in variables.items())])


def _epoch_row(client: MlflowClient, label: str, output: str, wall: float) -> dict[str, object]:
    [run_id] = re.findall(r"Run (\w+): test_accuracy=", output)
    epochs = [m.value for m in client.get_metric_history(run_id, "epoch_seconds")]
    slowest = [m.value for m in client.get_metric_history(run_id, "slowest_worker_epoch_seconds")]
    [fit] = re.findall(r"Timing: fit ([\d.]+) s", output)
    run = client.get_run(run_id)
    return {
        "training": label, "epochs": len(epochs), "epoch s (median)": round(statistics.median(epochs), 2),
        "slowest worker s (median)": round(statistics.median(slowest), 2) if slowest else "",
        "fit s": float(fit), "command s": round(wall, 1),
        "val_accuracy": round(run.data.metrics["val_accuracy"], 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", required=True, help="an .npz file on this machine (mounted into the containers)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--grid-epochs", type=int, default=3)
    args = parser.parse_args()
    dataset = str(Path(args.dataset).resolve())
    client = MlflowClient()
    compose = os.environ.get("COMPOSE", "docker compose").split()

    rows = []
    default = [*compose, "--progress", "quiet", "--profile", "cluster", "run", "--rm", "--no-deps",
               "--volume", f"{dataset}:{dataset}:ro", "--entrypoint", "python", "cluster-worker",
               "-m", "mlflow_project", "train", "--strategy", "default", "--epochs", str(args.epochs),
               "--dataset", dataset, *TRAINING_ARGS.split()]
    rows.append(_epoch_row(client, "default, 1 container", *_run(default)))
    for workers in (1, 2):
        output, wall = _make("cluster-train", WORKERS=str(workers), EPOCHS=str(args.epochs), DATASET=dataset,
                             ARGS=TRAINING_ARGS)
        rows.append(_epoch_row(client, f"multi_worker, {workers} container(s)", output, wall))
    print("| training | epochs | epoch s (median) | slowest worker s (median) | fit s | command s | val_accuracy |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")

    print("\n| sweep containers | trials | wall s |")
    print("| ---: | ---: | ---: |")
    stamp = time.strftime("%Y%m%d%H%M%S")
    for workers in (1, 2, 3):
        output, wall = _make("cluster-sweep", WORKERS=str(workers), EPOCHS=str(args.grid_epochs), DATASET=dataset,
                             STUDY=f"bench-{stamp}-{workers}", SEARCH=GRID)
        [trials] = set(re.findall(r"Sweep run \w+: (\d+) trials", output))
        print(f"| {workers} | {trials} | {wall:.1f} |", flush=True)


if __name__ == "__main__":
    main()
