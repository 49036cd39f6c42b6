"""What MLflow's system metrics cost a training: the CPU time of MLflow's SystemMetricsMonitor thread.

    .venv/bin/python bench/system_metrics_cost.py --dataset ../shared/data/fashion-mnist --epochs 20

Trains once in this process (`run_training`, SQLite store in a temporary directory, the CLI's 5 s
sampling interval) while a watcher reads the monitor thread's user + system CPU time from
/proc/self/task/<tid>/stat every 0.2 s. Prints that CPU time, the samples it logged, and the fit time
and the process's whole CPU time over the run for scale. The thread's CPU time does not depend on how
loaded the machine is, unlike a difference of two noisy fit times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")
TICKS = os.sysconf("SC_CLK_TCK")


def _thread_cpu_seconds(native_id: int) -> float | None:
    try:
        fields = Path(f"/proc/self/task/{native_id}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime (fields 14 and 15 of stat)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--epochs", default="20")
    arguments = parser.parse_args()
    dataset = str(Path(arguments.dataset).resolve())
    with tempfile.TemporaryDirectory(prefix="bench-sysmetrics-") as directory:
        os.chdir(directory)
        import mlflow

        mlflow.set_tracking_uri(f"sqlite:///{directory}/mlflow.db")
        from pipeline.config import TrainingConfig
        from pipeline.training.run import run_training

        seen: dict[int, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for thread in threading.enumerate():
                    if thread.name == "SystemMetricsMonitor" and thread.native_id:
                        cpu = _thread_cpu_seconds(thread.native_id)
                        if cpu is not None:
                            seen[thread.native_id] = cpu
                time.sleep(0.2)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        config = TrainingConfig.from_values({"dataset": dataset, "epochs": arguments.epochs})
        started, cpu_started = time.perf_counter(), time.process_time()
        result = run_training(config, experiment_name="system-metrics-cost")
        wall, cpu = time.perf_counter() - started, time.process_time() - cpu_started
        done.set()
        watcher.join()
        samples = len(mlflow.MlflowClient().get_metric_history(result.run_id, "system/cpu_utilization_percentage"))
    monitor = sum(seen.values())
    print(f"run wall {wall:.1f} s, process CPU {cpu:.1f} s, epochs {result.epochs_completed}")
    print(f"SystemMetricsMonitor CPU {monitor:.3f} s (last reading; at most 0.2 s before the thread ended), "
          f"{samples} samples: {100 * monitor / cpu:.2f}% of the process's CPU")


if __name__ == "__main__":
    main()
