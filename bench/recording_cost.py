"""What recording costs inside `fit`, measured from the inside instead of as a difference of noisy fit times.

    .venv/bin/python bench/recording_cost.py --dataset ../shared/data/fashion-mnist --epochs 20 --store both

`bench/overhead.py` compares whole fit times of separate processes; on a shared 2-core machine those
vary by up to a third from run to run, more than the 3% the recording may cost. This script trains once
per store in this process and adds up, during `fit` only:

- callbacks: wall time spent in the hooks of the callbacks plain Keras does not have (ADDED_CALLBACKS;
  BestCheckpoint's hook includes the save plain Keras' ModelCheckpoint makes too) on the training
  thread: time `fit` waits for them;
- recorder: CPU time of the recorder's background thread (queued records written and sent): at
  worst it takes a core or the GIL away from training for that long;
- server: CPU time of the tracking server's processes (server store only): on this machine the server
  shares the two cores with training; a team's server runs elsewhere.

The sum of the first two, divided by the fit time, bounds what recording adds to `fit` (the server's
share is reported apart). Prints a markdown table; `--output` writes it too.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from pipeline import callbacks as pipeline_callbacks  # noqa: E402
from pipeline.config import TrainingConfig  # noqa: E402
from pipeline.tracking.server import TrackingServer  # noqa: E402
from pipeline.training import run as training  # noqa: E402

# The callbacks our pipeline adds to the seed's plain-Keras ones.
ADDED_CALLBACKS = tuple(getattr(pipeline_callbacks, name) for name in (
    "TargetAccuracyStop", "DivergenceGuard", "BatchTiming", "BestCheckpoint", "LearningRateChanges",
    "TrainingStateBackup", "EpochMetricsLogger",
))
HOOKS = (
    "on_train_begin", "on_train_end", "on_epoch_begin", "on_epoch_end", "on_train_batch_begin",
    "on_train_batch_end", "on_test_begin", "on_test_end", "on_test_batch_begin", "on_test_batch_end",
)


class CostMeter:
    """Accumulates hook time of ADDED_CALLBACKS and the recorder thread's CPU time during fit."""

    def __init__(self) -> None:
        self.hook_seconds = 0.0
        self.fit_seconds = 0.0
        self.recorder_cpu_seconds = 0.0
        self.server_cpu_seconds = 0.0
        self.epochs = 0
        self.server_group: int | None = None

    @contextlib.contextmanager
    def instrumented(self) -> Iterator[None]:
        originals = []
        for cls in ADDED_CALLBACKS:
            for hook in HOOKS:
                if hook in vars(cls):
                    originals.append((cls, hook, vars(cls)[hook]))
                    setattr(cls, hook, self._timed(vars(cls)[hook]))
        original_fit = training._fit
        training._fit = self._timed_fit(original_fit)
        try:
            yield
        finally:
            training._fit = original_fit
            for cls, hook, function in originals:
                setattr(cls, hook, function)

    def _timed(self, function):
        def hook(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                self.hook_seconds += time.perf_counter() - started
        return hook

    def _timed_fit(self, fit):
        def timed_fit(model, config, distribution, splits, callbacks, initial_epoch):
            thread = callbacks.epoch_metrics.recorder._thread
            clock = time.pthread_getcpuclockid(thread.ident)
            recorder_before, server_before = time.clock_gettime(clock), self._server_cpu()
            started = time.perf_counter()
            history = fit(model, config, distribution, splits, callbacks, initial_epoch)
            self.fit_seconds = time.perf_counter() - started
            self.recorder_cpu_seconds = time.clock_gettime(clock) - recorder_before
            self.server_cpu_seconds = self._server_cpu() - server_before
            self.epochs = len(history.epoch)
            return history
        return timed_fit

    def _server_cpu(self) -> float:
        """User + system CPU seconds of every process in the server's process group."""
        if self.server_group is None:
            return 0.0
        ticks = 0
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            with contextlib.suppress(OSError, IndexError, ValueError):
                fields = (entry / "stat").read_text().rpartition(")")[2].split()
                if int(fields[2]) == self.server_group:  # pgrp
                    ticks += int(fields[11]) + int(fields[12])  # utime + stime
        return ticks / os.sysconf("SC_CLK_TCK")


def measure(store: str, epochs: int, dataset: str, workdir: Path) -> CostMeter:
    meter = CostMeter()
    config = TrainingConfig.from_values({"epochs": epochs, "dataset": dataset})
    with contextlib.ExitStack() as stack:
        if store == "server":
            server = stack.enter_context(TrackingServer(workdir / "server"))
            meter.server_group = os.getpgid(server.pid)
            environment = server.client_environment()
        else:
            environment = {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'local.db'}"}
        with mock.patch.dict(os.environ, environment), meter.instrumented():
            training.run_training(config, experiment_name="recording-cost")
    return meter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--store", choices=("local", "server", "both"), default="both")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--output", type=Path)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    dataset = str(Path(args.dataset).resolve())
    stores = ("local", "server") if args.store == "both" else (args.store,)
    lines = [
        "| store | epochs | fit | callbacks (training thread) | recorder thread CPU | (callbacks + recorder) / fit "
        "| server CPU |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for repeat in range(args.repeats):
        for store in stores:
            with tempfile.TemporaryDirectory(prefix="recording-cost-") as tmp:
                meter = measure(store, args.epochs, dataset, Path(tmp))
            share = (meter.hook_seconds + meter.recorder_cpu_seconds) / meter.fit_seconds
            server = f"{meter.server_cpu_seconds:.2f} s" if store == "server" else "-"
            line = (f"| {store} | {meter.epochs} | {meter.fit_seconds:.2f} s | {meter.hook_seconds:.3f} s "
                    f"| {meter.recorder_cpu_seconds:.3f} s | {share:.2%} | {server} |")
            print(f"repeat {repeat + 1}: {line}", flush=True)
            lines.append(line)
    report = "\n".join(lines) + "\n"
    print("\n" + report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
