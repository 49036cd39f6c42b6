"""`python -m tests.withheld_metrics STEP MARKER ARGS...`: `python -m mlflow_project ARGS...` against a tracking
store that never answers the request carrying the metrics of epoch STEP (a stalled store, for that request
only: everything before it is stored, everything after it waits in the recorder's queue behind it, as the
recorder delivers in order). MARKER is written, with the run id, when that request reaches the store.

A test kills the training once MARKER exists: the store then holds the training state of epoch STEP (delivered
before its metrics) and the metrics of every epoch before it, never those of epoch STEP; a resume must
re-send them from the state. The store itself is real; only the reply to that one request never comes.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

from mlflow.tracking import MlflowClient

from pipeline import constants as names


def main() -> None:
    step, marker, *args = sys.argv[1:]
    deliver = MlflowClient.log_batch

    def log_batch(self, run_id, metrics=(), *more, **options):
        if any(metric.key == names.LOSS and metric.step == int(step) for metric in metrics):
            Path(marker).write_text(run_id)
            threading.Event().wait()  # no answer, ever
        return deliver(self, run_id, metrics, *more, **options)

    MlflowClient.log_batch = log_batch
    sys.argv = ["mlflow_project", *args]
    from mlflow_project.__main__ import main as run_command

    run_command()


if __name__ == "__main__":
    main()
