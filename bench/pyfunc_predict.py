"""What one prediction of the logged model costs through MLflow's pyfunc, and what it prints.

    .venv/bin/python bench/pyfunc_predict.py --calls 50

Logs a model built as the pipeline builds it (steps_per_execution=64, the default) with the pipeline's
`log_model` into a SQLite store in a temporary directory, loads it with `mlflow.pyfunc.load_model` and
times `predict` on 1 row and on 100 rows, after one warm-up call each. Prints the median and best time
per call and how many bytes the calls wrote to the process's stdout and stderr (file descriptors 1 and 2).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=50, help="timed calls per input size")
    parser.add_argument("--steps-per-execution", type=int, default=64)
    args = parser.parse_args()
    sys.path.insert(0, str(PROJECT_DIR))
    with tempfile.TemporaryDirectory() as scratch:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{scratch}/mlflow.db"
        os.chdir(scratch)  # the store's artifacts go to ./mlruns
        import mlflow
        import numpy as np

        from pipeline.experiments.runs import logged_models_by_run
        from pipeline.tracking.model_logging import log_model
        from pipeline.tracking.recorder import RunRecorder
        from pipeline.training.model import build_model

        model = build_model((128, 64), 0.2, 0.001, args.steps_per_execution)
        rows = np.random.default_rng(0).random((100, 784), dtype=np.float32)
        client = mlflow.MlflowClient()
        with mlflow.start_run() as run, RunRecorder(client, run.info.run_id, Path(scratch) / "staging") as recorder:
            log_model(recorder, model, rows[:5], Path(scratch), deadline=float("inf"))
        run_id = run.info.run_id
        model_id = logged_models_by_run(client, run.info.experiment_id, run_id)[run_id]
        pyfunc_model = mlflow.pyfunc.load_model(f"models:/{model_id}")
        print(f"MLflow {mlflow.__version__}, steps_per_execution={args.steps_per_execution}, {args.calls} calls each")
        for size in (1, 100):
            batch = rows[:size]
            pyfunc_model.predict(batch)  # warm-up: the predict function is traced on the first call
            seconds = []
            with tempfile.TemporaryFile() as capture:
                saved = [os.dup(1), os.dup(2)]
                sys.stdout.flush()
                os.dup2(capture.fileno(), 1)
                os.dup2(capture.fileno(), 2)
                try:
                    for _ in range(args.calls):
                        started = time.perf_counter()
                        pyfunc_model.predict(batch)
                        seconds.append(time.perf_counter() - started)
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os.dup2(saved[0], 1)
                    os.dup2(saved[1], 2)
                written = capture.seek(0, os.SEEK_END)
            median, best = statistics.median(seconds) * 1000, min(seconds) * 1000
            print(f"{size:>3} rows: median {median:.2f} ms, best {best:.2f} ms per call;"
                  f" {written / args.calls:.0f} bytes written per call")


if __name__ == "__main__":
    main()
