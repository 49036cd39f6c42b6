"""Search against enumeration: a grid of 18 trials vs random vs TPE with pruning, same budget of trials.

    .venv/bin/python bench/sweep_search.py --dataset ../shared/data/fashion-mnist --epochs 12 --seeds 1 2 3
    .venv/bin/python bench/sweep_search.py --dataset ../shared/data/fashion-mnist --epochs 12 \
        --seeds 1 2 3 4 5 6 --searches grid tpe+budget --keep /tmp/sweeps
    .venv/bin/python bench/sweep_search.py --dataset ../shared/data/fashion-mnist --epochs 12 --workers-timing

Each sweep is the `sweep` command in a fresh process, all on one SQLite store (an experiment each). The grid is
learning_rate x dropout x hidden_units (3 x 2 x 3); random and TPE search the ranges that hold it
(learning_rate 1e-4..1e-2 on a log scale, dropout 0..0.5) and the same three architectures; TPE prunes
with the median pruner (`tpe+median`) or the default budget pruner (`tpe+budget`). `seed`
seeds the sampler and the trials' training alike. Per sweep: the best test accuracy of its finished
trials, the epochs trained over all trials, how many were pruned and how many paused ones were continued, and the
wall time. `--workers-timing` runs two studies of
12 trials with workers=1 and then workers=2 and reports their wall times: a 12-point grid without
pruning (the same work either way) and TPE with median pruning (what pruning stops can differ).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

PROJECT_DIR = Path(__file__).resolve().parents[1]
ARCHITECTURES = "128,64;256,128;512"
SEARCHES = {
    "grid": {"sampler": "grid", "learning_rate": "0.0003,0.001,0.003", "dropout": "0.1,0.3",
             "hidden_units": ARCHITECTURES},
    "random": {"sampler": "random", "trials": "18", "pruner": "none", "learning_rate": "1e-4:1e-2:log",
               "dropout": "0.0:0.5", "hidden_units": ARCHITECTURES},
    "tpe+median": {"sampler": "tpe", "trials": "18", "pruner": "median", "learning_rate": "1e-4:1e-2:log",
                   "dropout": "0.0:0.5", "hidden_units": ARCHITECTURES},
}
SEARCHES["tpe+budget"] = SEARCHES["tpe+median"] | {"pruner": "budget"}  # the default pruner
WORKERS_TIMING = {
    "grid12": SEARCHES["grid"] | {"hidden_units": "128,64;256"},  # 3 x 2 x 2 points
    "tpe+median": SEARCHES["tpe+median"] | {"trials": "12"},
}


def run_sweep(workdir: Path, name: str, parameters: dict[str, str]) -> dict[str, object]:
    """One sweep in a fresh process; its best test accuracy, epochs trained and wall time."""
    store = f"sqlite:///{workdir / 'mlflow.db'}"
    command = [sys.executable, "-m", "mlflow_project", "sweep", "--experiment-name", name]
    for key, value in parameters.items():
        command += [f"--{key.replace('_', '-')}", value]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=workdir, capture_output=True, text=True,
                            env={**os.environ, "MLFLOW_TRACKING_URI": store, "PYTHONPATH": str(PROJECT_DIR)})
    seconds = time.perf_counter() - started
    if result.returncode != 0:
        raise SystemExit(f"{name} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    import mlflow

    mlflow.set_tracking_uri(store)
    experiment = mlflow.get_experiment_by_name(name)
    runs = mlflow.search_runs([experiment.experiment_id], "tags.run_type = 'training'")
    finished = runs[runs["tags.trial_state"] == "finished"]
    return {
        "sweep": name,
        "best_test_accuracy": float(finished["metrics.test_accuracy"].max()),
        "epochs_trained": int(runs["metrics.epochs_completed"].sum()),
        "trials": len(runs),
        "pruned": int((runs["tags.trial_state"] == "pruned").sum()),
        "continued": int(runs.get("tags.continued_by_trial", pd.Series(dtype=str)).notna().sum()),
        "wall_seconds": round(seconds, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--epochs", default="12")
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--workers-timing", action="store_true")
    parser.add_argument("--searches", nargs="+", choices=list(SEARCHES), default=list(SEARCHES))
    parser.add_argument("--keep", type=Path, help="keep each sweep's store and study in this directory (default: "
                        "a temporary one, deleted)")
    parser.add_argument("--output", type=Path, help="also write the rows as JSON lines here")
    arguments = parser.parse_args()
    fixed = {"dataset": str(Path(arguments.dataset).resolve()), "epochs": arguments.epochs}
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as directory:
        workdir = arguments.keep or Path(directory)
        workdir.mkdir(parents=True, exist_ok=True)
        if arguments.workers_timing:
            for name, search in WORKERS_TIMING.items():
                for workers in ("1", "2"):
                    parameters = fixed | search | {"seed": arguments.seeds[0], "workers": workers}
                    rows.append(run_sweep(workdir, f"{name}-workers{workers}", parameters) | {"workers": workers})
                    print(json.dumps(rows[-1]), flush=True)
        else:
            for seed in arguments.seeds:
                for name in arguments.searches:
                    search = SEARCHES[name]
                    rows.append(run_sweep(workdir, f"{name}-seed{seed}", fixed | search | {"seed": seed}))
                    print(json.dumps(rows[-1]), flush=True)
    if arguments.output:
        arguments.output.write_text("".join(json.dumps(row) + "\n" for row in rows))
    print(pd.DataFrame(rows).to_markdown(index=False) if _has_tabulate() else pd.DataFrame(rows).to_string())


def _has_tabulate() -> bool:
    import importlib.util

    return importlib.util.find_spec("tabulate") is not None


if __name__ == "__main__":
    main()
