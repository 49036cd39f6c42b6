"""K concurrent trainings against one tracking server, recorded exactly as a training records them.

    .venv/bin/python bench/server_load.py --trainings 1 4 16 64 --epochs 10 --epoch-seconds 1
    .venv/bin/python bench/server_load.py --tracking-uri https://HOST:PORT --trainings 8   # a running server
    .venv/bin/python bench/server_load.py --trainings 0 16 64 --epochs 40 --beside ../shared/data/fashion-mnist \
        --beside-epochs 5

Without --tracking-uri the native launcher starts the team server as the compose stack runs it: PostgreSQL
(a fresh database on 127.0.0.1:5432), artifacts proxied to S3 (moto's server on loopback, in memory), basic
auth, docker/start-mlflow-server.sh. With it, the credentials come from MLFLOW_TRACKING_USERNAME/PASSWORD.

Each simulated training is a thread with its own `RunRecorder` (the pipeline's recorder, unchanged) and its
own MLflow client, in client processes of at most --per-process trainings each (so that the client side is
not one Python interpreter's GIL). A training creates its run with the pipeline's parameters, then every
--epoch-seconds queues what a real epoch queues, in the same order and at the real sizes (a `.keras` file
and a resumable state of the default model, made once with Keras): the epoch's metrics, the best checkpoint
and its description in the epoch's directory, then the tags pointing at it (on every epoch: worst case, a new
best each time; the LoggedModel a training also makes of each best is left out: it needs Keras), the
state in its epoch's slot; at the end `epochs_completed` and the stop reason, then it closes the
recorder (which waits for delivery) and ends the run FINISHED.

Per level it reports p50/p99 latency of each kind of request the recorder sent (log_batch, log_artifact),
requests that raised (the recorder retried them), errors surfaced to a training (a flush that raised),
the server's CPU seconds and peak memory (its process tree: the native launcher's, or --server-pid's), how
late the trainings' epochs fell behind their schedule, the longest a record waited in a recorder's queue and
how many trainings fell behind (a record waited longer than the recorder's BEHIND_SECONDS), and then reads
every run back: each epoch metric once per epoch, every artifact present at the size last queued, the tag
`recording_max_lag_seconds` on exactly the runs that fell behind. Exit 1 when anything was lost or surfaced.

With --beside DATASET, each level also starts two real trainings (`python -m mlflow_project train`) of
DATASET as the load starts, at the same time and with the same parameters: one recording to the loaded
server, one to a local SQLite file. Both share the machine with the load alike, so the ratio of their fit
times is what recording to a loaded server costs a training (K = 0: the same pair without load). With
--beside-cpus, the trainings run on those CPUs while the bench, its server and clients run where the bench was
started (e.g. `taskset -c 0`): a server on cores of its own.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import multiprocessing
import os
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from mlflow.entities import Param  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

from pipeline import constants as names  # noqa: E402
from pipeline.config import TrainingConfig  # noqa: E402
from pipeline.errors import LocalStorageError, RecordingError  # noqa: E402
from pipeline.tracking.recorder import BEHIND_SECONDS, RunRecorder, json_text  # noqa: E402

BUCKET = "mlflow-artifacts"


# -- the payload: a real checkpoint and state of the default model -------------------------------

def make_payload(directory: Path) -> dict[str, Path]:
    """Writes the default model's `.keras` checkpoint (with Adam's state) and a resumable state holding
    it, as a training writes them after its first epoch; returns their paths."""
    import keras
    import numpy as np

    from pipeline.tracking.training_state import TrainingState, optimizer_values
    from pipeline.training.model import build_model

    config = TrainingConfig.from_values()
    model = build_model(config.layer_sizes, config.dropout, config.learning_rate)
    rows = np.zeros((8, names.NUM_PIXELS), np.float32)
    model.fit(rows, keras.utils.to_categorical(np.zeros(8), names.NUM_CLASSES), epochs=1, verbose=0)
    checkpoint = directory / names.BEST_MODEL_FILE
    model.save(checkpoint)
    state = TrainingState(
        epoch=0, model_weights=model.get_weights(), optimizer_variables=optimizer_values(model),
        early_stopping_weights=model.get_weights(), best_checkpoint=checkpoint.read_bytes(),
        record={}, csv_log="epoch,loss\n0,1.0\n",
    )
    state_path = directory / names.STATE_FILES[0]
    state.save(state_path)
    return {"checkpoint": checkpoint, "state": state_path}


# -- one client process: several trainings, each a thread ----------------------------------------

class TimedClient(MlflowClient):
    """A real MLflow client that times each call the recorder makes and counts the ones that raised."""

    def __init__(self, tracking_uri: str, timings: dict[str, list[float]], raised: dict[str, int]) -> None:
        super().__init__(tracking_uri)
        self.timings = timings
        self.raised = raised

    def _timed(self, kind: str, call, *args, **kwargs):
        started = time.perf_counter()
        try:
            result = call(*args, **kwargs)
        except Exception:
            self.raised[kind] = self.raised.get(kind, 0) + 1
            raise
        self.timings.setdefault(kind, []).append(time.perf_counter() - started)
        return result

    def log_batch(self, *args, **kwargs):
        return self._timed("log_batch", super().log_batch, *args, **kwargs)

    def log_artifact(self, *args, **kwargs):
        return self._timed("log_artifact", super().log_artifact, *args, **kwargs)


def train(client: TimedClient, experiment_id: str, payload: dict[str, bytes],
          epochs: int, epoch_seconds: float, staging: Path, result: dict) -> None:
    """One simulated training; fills `result` (run id, lateness, the error surfaced if any)."""
    lateness = result["lateness"] = []
    try:
        run = client.create_run(experiment_id, tags={names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING})
        run_id = result["run_id"] = run.info.run_id
        params = TrainingConfig.from_values().as_params()
        client.log_batch(run_id, params=[Param(key, value) for key, value in params.items()])
    except Exception as error:  # noqa: BLE001 - a training that could not start its run is an error surfaced
        result["error"] = f"run not started: {error}"
        return
    start = time.monotonic()
    try:
        with RunRecorder(client, run_id, staging, abandon_timeout=0) as recorder:
            for epoch in range(epochs):
                due = start + (epoch + 1) * epoch_seconds
                time.sleep(max(0.0, due - time.monotonic()))
                lateness.append(max(0.0, time.monotonic() - due))
                record = {"epoch": epoch, names.VAL_ACCURACY: 0.5 + epoch / 1000, names.VAL_LOSS: 1.0 - epoch / 1000}
                recorder.log_together(
                    names.checkpoint_dir(epoch),
                    {names.BEST_MODEL_FILE: payload["checkpoint"],
                     names.BEST_MODEL_INFO_FILE: json_text(record).encode()},
                    tags={names.TAG_BEST_EPOCH: epoch, names.TAG_LATEST_CHECKPOINT: names.checkpoint_file(epoch)},
                    slot=names.CHECKPOINT_DIR,
                )
                recorder.log_written(lambda path: path.write_bytes(payload["state"]), names.state_artifact(epoch))
                recorder.log_metrics({key: 0.5 + epoch / 1000 for key in names.EPOCH_METRICS}, step=epoch)
            recorder.log_metrics({names.EPOCHS_COMPLETED: epochs}, step=0)
            recorder.set_tags({names.TAG_STOP_REASON: names.STOP_COMPLETED})
            recorder.close()
        result["max_lag"] = recorder.max_lag
        client.set_terminated(run_id, "FINISHED")
    except (RecordingError, LocalStorageError) as error:
        result["error"] = str(error)
        client.set_terminated(run_id, "FAILED")


def client_process(tracking_uri: str, credentials: dict[str, str], experiment_id: str, payload_paths: dict[str, str],
                   trainings: int, epochs: int, epoch_seconds: float, output: str) -> None:
    """A client process: `trainings` threads; writes their results and timings as JSON to `output`.
    It imports neither Keras nor TensorFlow."""
    os.environ.update(credentials)
    payload = {key: Path(path).read_bytes() for key, path in payload_paths.items()}
    timings: dict[str, list[float]] = {}
    raised: dict[str, int] = {}
    results = [{} for _ in range(trainings)]
    with tempfile.TemporaryDirectory(prefix="server-load-") as scratch:
        threads = [
            threading.Thread(target=train, args=(
                TimedClient(tracking_uri, timings, raised), experiment_id, payload, epochs, epoch_seconds,
                Path(scratch) / str(index), results[index],
            ))
            for index in range(trainings)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    Path(output).write_text(json.dumps({"results": results, "timings": timings, "raised": raised}))


# -- a level: K trainings at once ------------------------------------------------------------------

def percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def server_usage(pid: int | None) -> tuple[float, float]:
    """CPU seconds and resident memory (MB) of a process and its children (0, 0 when unknown)."""
    if pid is None:
        return 0.0, 0.0
    import psutil

    try:
        processes = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0
    cpu = memory = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            cpu += times.user + times.system
            memory += process.memory_info().rss / 2**20
    return cpu, memory


def check_runs(client: MlflowClient, results: list[dict], epochs: int, sizes: dict[str, int]) -> list[str]:
    """What the store lacks: every epoch metric once per epoch, every artifact at its size."""
    missing = []
    expected_files = {
        names.checkpoint_file(epochs - 1): sizes["checkpoint"],
        **{names.state_artifact(epoch): sizes["state"] for epoch in range(max(0, epochs - 2), epochs)},
    }
    for result in results:
        run_id = result.get("run_id")
        if run_id is None:
            missing.append("a training created no run")
            continue
        run = client.get_run(run_id)
        if run.info.status != "FINISHED":
            missing.append(f"{run_id}: {run.info.status}")
        for key in names.EPOCH_METRICS:
            steps = [metric.step for metric in client.get_metric_history(run_id, key)]
            if sorted(steps) != list(range(epochs)):
                missing.append(f"{run_id}: {key} steps {sorted(steps)}")
        lag_tag = run.data.tags.get(names.TAG_RECORDING_MAX_LAG)
        if (lag_tag is not None) != (result.get("max_lag", 0) > BEHIND_SECONDS):
            missing.append(f"{run_id}: {names.TAG_RECORDING_MAX_LAG} {lag_tag}, longest wait {result.get('max_lag')} s")
        if run.data.tags.get(names.TAG_BEST_EPOCH) != str(epochs - 1):
            missing.append(f"{run_id}: best_epoch {run.data.tags.get(names.TAG_BEST_EPOCH)}")
        if run.data.tags.get(names.TAG_LATEST_CHECKPOINT) != names.checkpoint_file(epochs - 1):
            missing.append(f"{run_id}: {names.TAG_LATEST_CHECKPOINT} {run.data.tags.get(names.TAG_LATEST_CHECKPOINT)}")
        listed = {}
        for directory in (names.checkpoint_dir(epochs - 1), names.STATE_DIR):
            listed |= {item.path: item.file_size for item in client.list_artifacts(run_id, directory)}
        for path, size in expected_files.items():
            if listed.get(path) != size:
                missing.append(f"{run_id}: {path} {listed.get(path)} bytes, expected {size}")
    return missing


FIT_LINE = "Timing: fit "  # what a training logs at its end: "Timing: fit 12.34 s, after fit 1.23 s"


def start_training(dataset: str, epochs: int, cpus: str | None, tracking_uri: str, cwd: Path) -> subprocess.Popen:
    """A real training of `dataset` recording to `tracking_uri` (the default model, no early stop), on
    the CPUs `cpus` (taskset's list) when given."""
    return subprocess.Popen(
        [*(["taskset", "-c", cpus] if cpus else []), sys.executable, "-m", "mlflow_project", "train",
         "--dataset", str(Path(dataset).resolve()),
         "--epochs", str(epochs), "--target-accuracy", "0", "--es-patience", str(epochs), "--seed", "1",
         "--experiment-name", "beside-load"],
        cwd=cwd, env=os.environ | {"MLFLOW_TRACKING_URI": tracking_uri, "PYTHONPATH": str(PROJECT_DIR)},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def fit_seconds(training: subprocess.Popen) -> float:
    output, _ = training.communicate(timeout=1800)
    lines = [line for line in output.splitlines() if FIT_LINE in line]
    if training.returncode != 0 or not lines:
        raise RuntimeError(f"the training beside the load failed ({training.returncode}): {output[-2000:]}")
    return float(lines[-1].split(FIT_LINE)[1].split()[0])


def run_level(tracking_uri: str, credentials: dict[str, str], server_pid: int | None, payload: dict[str, Path],
              trainings: int, epochs: int, epoch_seconds: float, per_process: int,
              experiment_name: str, beside: tuple[str, int, str | None] | None = None) -> dict:
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    experiment_id = experiment.experiment_id if experiment else client.create_experiment(experiment_name)
    context = multiprocessing.get_context("spawn")
    cpu_before, _ = server_usage(server_pid)
    peak_memory = 0.0
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="server-load-level-") as scratch:
        outputs, processes = [], []
        for index, first in enumerate(range(0, trainings, per_process)):
            outputs.append(Path(scratch) / f"client-{index}.json")
            processes.append(context.Process(target=client_process, args=(
                tracking_uri, credentials, experiment_id, {key: str(path) for key, path in payload.items()},
                min(per_process, trainings - first), epochs, epoch_seconds, str(outputs[-1]),
            )))
        for process in processes:
            process.start()
        pair = [start_training(*beside, uri, Path(scratch)) for uri in (tracking_uri, f"sqlite:///{scratch}/beside.db")
                ] if beside else []
        while any(process.is_alive() for process in processes):
            peak_memory = max(peak_memory, server_usage(server_pid)[1])
            time.sleep(0.5)
        wall = time.perf_counter() - started
        fits = [fit_seconds(training) for training in pair]
        reports = [json.loads(path.read_text()) for path in outputs if path.exists()]
    cpu_after, _ = server_usage(server_pid)
    results = [result for report in reports for result in report["results"]]
    timings: dict[str, list[float]] = {}
    raised: dict[str, int] = {}
    for report in reports:
        for kind, values in report["timings"].items():
            timings.setdefault(kind, []).extend(values)
        for kind, count in report["raised"].items():
            raised[kind] = raised.get(kind, 0) + count
    sizes = {key: path.stat().st_size for key, path in payload.items()}
    lost = check_runs(client, results, epochs, sizes)
    if len(results) < trainings:
        lost.append(f"{trainings - len(results)} trainings reported nothing (client process died)")
    lateness = [value for result in results for value in result.get("lateness", [])]
    lags = [result["max_lag"] for result in results if "max_lag" in result]
    return {
        "trainings": trainings, "epochs": epochs, "epoch_seconds": epoch_seconds, "wall_seconds": round(wall, 1),
        "requests": {kind: {"count": len(values), "p50_ms": round(1000 * percentile(values, 0.5), 1),
                            "p99_ms": round(1000 * percentile(values, 0.99), 1)}
                     for kind, values in sorted(timings.items())},
        "raised": raised,
        "surfaced": [result["error"] for result in results if "error" in result],
        "lost": lost,
        "epoch_late_p99_s": round(percentile(lateness, 0.99), 2),
        "record_wait_max_s": round(max(lags, default=float("nan")), 1),
        "fell_behind": sum(lag > BEHIND_SECONDS for lag in lags),
        "server_cpu_seconds": round(cpu_after - cpu_before, 1) if server_pid else None,
        "server_peak_rss_mb": round(peak_memory) if server_pid else None,
        "bytes_per_epoch": sizes["checkpoint"] + sizes["state"],
        **({"fit_to_server_s": fits[0], "fit_to_sqlite_s": fits[1]} if fits else {}),
    }


# -- the native team server ------------------------------------------------------------------------

@contextlib.contextmanager
def native_server(root: Path, workers: int) -> Iterator[tuple[str, dict[str, str], int]]:
    """PostgreSQL + moto S3 + docker/start-mlflow-server.sh with `workers` server workers; yields (uri,
    credentials, server pid)."""
    import psycopg2
    import requests

    from pipeline.tracking.process_group import free_port
    from pipeline.tracking.server import TrackingServer
    from pipeline.tracking.server_stores import ArtifactStore

    database = f"server_load_{secrets.token_hex(4)}"
    admin = psycopg2.connect("host=127.0.0.1 port=5432 user=postgres dbname=postgres connect_timeout=3")
    admin.autocommit = True
    admin.cursor().execute(f'CREATE DATABASE "{database}"')
    port = free_port("127.0.0.1")
    moto = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    s3 = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": secrets.token_hex(8),
          "AWS_SECRET_ACCESS_KEY": secrets.token_hex(16), "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        for _ in range(120):
            with contextlib.suppress(requests.ConnectionError):
                requests.get(f"{s3['MLFLOW_S3_ENDPOINT_URL']}/moto-api/", timeout=2)
                break
            time.sleep(0.5)
        subprocess.run([sys.executable, str(PROJECT_DIR / "docker" / "create-bucket.py")], check=True,
                       env=os.environ | s3 | {"S3_BUCKET": BUCKET}, capture_output=True, timeout=120)
        uri = f"postgresql+psycopg2://postgres@127.0.0.1:5432/{database}"
        server = TrackingServer(root, uri, artifact_store=ArtifactStore(f"s3://{BUCKET}/", s3))
        server.workers = workers
        with server:
            yield server.uri, server.client_environment(), server.pid
    finally:
        os.killpg(moto.pid, signal.SIGTERM)
        moto.wait(timeout=30)
        admin.cursor().execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
        admin.close()


def table(levels: list[dict]) -> str:
    lines = [
        "| K | wall s | log_batch p50 / p99 ms | log_artifact p50 / p99 ms | raised (retried) | surfaced | lost "
        "| epoch late p99 s | record waited max s | fell behind | server CPU s | server peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for level in levels:
        requests_ = level["requests"]
        cells = [
            f"{requests_[kind]['p50_ms']} / {requests_[kind]['p99_ms']}" if kind in requests_ else "-"
            for kind in ("log_batch", "log_artifact")
        ]
        lines.append(
            f"| {level['trainings']} | {level['wall_seconds']} | {cells[0]} | {cells[1]} "
            f"| {sum(level['raised'].values())} | {len(level['surfaced'])} | {len(level['lost'])} "
            f"| {level['epoch_late_p99_s']} | {level['record_wait_max_s']} | {level['fell_behind']} "
            f"| {level['server_cpu_seconds']} | {level['server_peak_rss_mb']} |"
        )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trainings", type=int, nargs="+", default=[1, 4, 16, 64], help="K, one level each")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--epoch-seconds", type=float, default=1.0, help="one epoch per this many seconds")
    parser.add_argument("--per-process", type=int, default=8, help="trainings per client process")
    parser.add_argument("--tracking-uri", help="a running server (default: start the native team server)")
    parser.add_argument("--workers", type=int, default=1, help="the native server's worker processes "
                        "(MLFLOW_WORKERS)")
    parser.add_argument("--server-pid", type=int, help="with --tracking-uri: the server's process, whose tree's CPU "
                        "and memory are measured (compose: docker inspect -f '{{.State.Pid}}' CONTAINER)")
    parser.add_argument("--experiment", default="server-load", help="the experiment the trainings record into")
    parser.add_argument("--json", help="also write the levels as JSON here")
    parser.add_argument("--beside", metavar="DATASET", help="also time two real trainings of DATASET per level")
    parser.add_argument("--beside-epochs", type=int, default=5)
    parser.add_argument("--beside-cpus", help="run the two trainings on these CPUs only (taskset -c), e.g. 1 while "
                        "the bench itself runs under taskset -c 0")
    args = parser.parse_args()

    # The client processes run several trainings as threads, where each real training is a process of its own:
    # MLflow's telemetry writes a session variable into os.environ from its own thread, and a training thread
    # reading os.environ at that moment fails (KeyError: '_MLFLOW_TELEMETRY_SESSION_ID', seen once at K = 64).
    # The clients (spawned: they inherit this) therefore run without telemetry, which cannot reach its endpoint
    # from here anyway.
    os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
    with tempfile.TemporaryDirectory(prefix="server-load-") as scratch:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras' build messages
            payload = make_payload(Path(scratch))
        with contextlib.ExitStack() as stack:
            if args.tracking_uri:
                uri, pid = args.tracking_uri, args.server_pid
                credentials = {key: os.environ[key] for key in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
                               if key in os.environ}
            else:
                uri, credentials, pid = stack.enter_context(native_server(Path(scratch) / "server", args.workers))
            os.environ.update(credentials)
            levels = []
            for trainings in args.trainings:
                level = run_level(uri, credentials, pid, payload, trainings, args.epochs, args.epoch_seconds,
                                  args.per_process, args.experiment,
                                  (args.beside, args.beside_epochs, args.beside_cpus) if args.beside else None)
                levels.append(level)
                print(json.dumps(level), flush=True)
    server = args.tracking_uri or f"native launcher (PostgreSQL + moto S3), {args.workers} worker(s)"
    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; server: {server}; "
          f"{args.epochs} epochs at one per {args.epoch_seconds} s; "
          f"{levels[0]['bytes_per_epoch']} bytes queued per epoch and training")
    print(table(levels))
    for level in levels:
        if "fit_to_server_s" in level:
            print(f"K = {level['trainings']}: fit recording to the server {level['fit_to_server_s']} s, to SQLite "
                  f"{level['fit_to_sqlite_s']} s ({level['fit_to_server_s'] / level['fit_to_sqlite_s']:.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(levels, indent=1) + "\n")
    return 1 if any(level["lost"] or level["surfaced"] for level in levels) else 0


if __name__ == "__main__":
    raise SystemExit(main())
