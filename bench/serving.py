"""What the served champion costs per request: `mlflow models serve` (as the compose `serve` service runs
it) beside two floors, the model in process and the same HTTP+JSON round trip answered without a model.

    .venv/bin/python bench/serving.py --requests 300 --batches 40
    .venv/bin/python bench/serving.py --url http://127.0.0.1:5001   # also time a running server (compose)

Logs the default model as the pipeline logs it (`log_model`, SQLite store in a temporary directory), registers
it and points the `champion` alias at it, then starts `python -m mlflow_project serve` (the compose service's
command: it waits for the champion, then becomes `mlflow models serve` of that version). One client with a
kept-alive connection (requests.Session) sends --requests one-digit requests, then --batches requests of
256 digits (real test digits of tests/data/mnist-small.npz, scaled to 0..1), after 5 warm-up requests each, in
each of the two request formats docs/team-server.md shows: JSON (`{"inputs": [[784 floats], ...]}`) and
Parquet (a DataFrame of 784 float32 columns, `Content-Type: application/vnd.apache.parquet`).
The floors, in the same run:
- in process: the loaded pyfunc model's `predict` and the Keras model's `predict_on_batch`;
- transport: a FastAPI app under uvicorn (what MLflow's scoring server is) whose `/invocations` parses the
  same body (JSON, or Parquet with pandas) into an array and answers the same shape of zeros: the cost of
  HTTP and the format alone. Percentages are of the JSON floor's digits/s (the issue's yardstick).
Prints p50/p99 per one-digit request, digits per second at batch 256, and the bytes the server wrote to its
log per request.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT_DIR))

from pipeline.experiments.serving import JSON_CONTENT_TYPE, PARQUET_CONTENT_TYPE, request_body  # noqa: E402

FLOOR_APP = '''
import io, json
import numpy as np, pandas as pd
from fastapi import FastAPI, Request, Response
app = FastAPI()
@app.get("/ping")
def ping():
    return Response("\\n", media_type="application/json")
@app.post("/invocations")
async def invocations(request: Request):
    body = await request.body()
    if request.headers["content-type"] == "application/vnd.apache.parquet":
        rows = pd.read_parquet(io.BytesIO(body)).to_numpy(np.float32)
    else:
        rows = np.array(json.loads(body)["inputs"], np.float32)
    return Response(json.dumps({"predictions": [[0.0] * 10 for _ in rows]}), media_type="application/json")
'''
FORMATS = {"JSON": JSON_CONTENT_TYPE, "Parquet": PARQUET_CONTENT_TYPE}


def free_port() -> int:
    from pipeline.tracking.process_group import free_port as free

    return free("127.0.0.1")


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path, env: dict[str, str], cwd: Path) -> Iterator[str]:
    """Runs `command` in its own session until it answers /ping; yields its base URL; stops its group."""
    import requests

    with open(log, "wb") as output:
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                                   start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{command[:3]} exited {process.returncode}: {log.read_text()[-2000:]}")
            with contextlib.suppress(requests.ConnectionError):
                if requests.get(f"{url}/ping", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{command[:3]} did not answer /ping: {log.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=60)


def time_requests(url: str, rows, requests_count: int, batches: int, log: Path | None,
                  content_type: str) -> dict[str, float]:
    """p50/p99 of one-digit requests, digits/s at batch 256, log bytes per request."""
    import requests

    session = requests.Session()
    one = request_body(rows[:1], content_type)
    batch = request_body(rows[:256], content_type)
    headers = {"Content-Type": content_type}

    def post(body: bytes) -> None:
        answer = session.post(f"{url}/invocations", data=body, headers=headers, timeout=60)
        answer.raise_for_status()

    for body in (one, batch):
        for _ in range(5):
            post(body)
    log_before = log.stat().st_size if log else 0
    seconds = []
    for _ in range(requests_count):
        started = time.perf_counter()
        post(one)
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(batches):
        post(batch)
    batch_seconds = time.perf_counter() - started
    log_growth = (log.stat().st_size - log_before) if log else float("nan")
    return {
        "p50_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * sorted(seconds)[min(len(seconds) - 1, int(0.99 * len(seconds)))],
        "digits_per_s": 256 * batches / batch_seconds,
        "log_bytes_per_request": log_growth / (requests_count + batches),
    }


def time_in_process(function, rows, calls: int, batches: int) -> dict[str, float]:
    for _ in range(5):
        function(rows[:1])
        function(rows[:256])
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        function(rows[:1])
        seconds.append(time.perf_counter() - started)
    started = time.perf_counter()
    for _ in range(batches):
        function(rows[:256])
    return {
        "p50_ms": 1000 * statistics.median(seconds),
        "p99_ms": 1000 * sorted(seconds)[min(len(seconds) - 1, int(0.99 * len(seconds)))],
        "digits_per_s": 256 * batches / (time.perf_counter() - started),
        "log_bytes_per_request": 0.0,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="one-digit requests per variant")
    parser.add_argument("--batches", type=int, default=40, help="256-digit requests per variant")
    parser.add_argument("--url", help="also time this running scoring server (e.g. the compose serve profile)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="serving-bench-") as scratch_name:
        scratch = Path(scratch_name)
        store = f"sqlite:///{scratch}/mlflow.db"
        os.environ["MLFLOW_TRACKING_URI"] = store
        os.chdir(scratch)
        import mlflow
        import numpy as np

        from pipeline.config import TrainingConfig
        from pipeline.constants import CHAMPION_ALIAS
        from pipeline.experiments.runs import logged_models_by_run
        from pipeline.tracking.model_logging import log_model
        from pipeline.tracking.recorder import RunRecorder
        from pipeline.training.model import build_model

        config = TrainingConfig.from_values()
        model = build_model(config.layer_sizes, config.dropout, config.learning_rate, config.steps_per_execution)
        digits = np.load(PROJECT_DIR / "tests" / "data" / "mnist-small.npz")["x_test"][:256]
        rows = (digits.reshape(len(digits), -1) / 255).astype(np.float32)
        client = mlflow.MlflowClient()
        with mlflow.start_run() as run, RunRecorder(client, run.info.run_id, scratch / "staging") as recorder:
            log_model(recorder, model, rows[:5], scratch, deadline=float("inf"))
        model_id = logged_models_by_run(client, run.info.experiment_id, run.info.run_id)[run.info.run_id]
        version = mlflow.register_model(f"models:/{model_id}", "bench-serving").version
        client.set_registered_model_alias("bench-serving", CHAMPION_ALIAS, version)

        results: dict[str, dict[str, float]] = {}
        pyfunc_model = mlflow.pyfunc.load_model(f"models:/{model_id}")
        keras_model = mlflow.tensorflow.load_model(f"models:/{model_id}")
        results["in process: Keras predict_on_batch"] = time_in_process(keras_model.predict_on_batch, rows,
                                                                         args.requests, args.batches)
        results["in process: pyfunc predict"] = time_in_process(pyfunc_model.predict, rows, args.requests,
                                                                args.batches)
        env = os.environ | {"PYTHONPATH": str(PROJECT_DIR),  # `serve` execs `mlflow`: this environment's
                            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
        (scratch / "floor.py").write_text(FLOOR_APP)
        port = free_port()
        with server([sys.executable, "-m", "uvicorn", "--app-dir", str(scratch), "--host", "127.0.0.1", "--port",
                     str(port), "--no-access-log", "floor:app"], port, scratch / "floor.log", env, scratch) as url:
            for name, content_type in FORMATS.items():
                results[f"transport floor, {name}: FastAPI + uvicorn, no model"] = time_requests(
                    url, rows, args.requests, args.batches, None, content_type)
        port = free_port()
        log = scratch / "serve.log"
        with server([sys.executable, "-m", "mlflow_project", "serve", "--model-name", "bench-serving",
                     "--port", str(port)], port, log, env, scratch) as url:
            for name, content_type in FORMATS.items():
                results[f"mlflow_project serve (mlflow models serve), {name}"] = time_requests(
                    url, rows, args.requests, args.batches, log, content_type)
        if args.url:
            for name, content_type in FORMATS.items():
                results[f"running server {args.url}, {name}"] = time_requests(
                    args.url, rows, args.requests, args.batches, None, content_type)

    floor = results["transport floor, JSON: FastAPI + uvicorn, no model"]["digits_per_s"]
    print(f"{platform.machine()}, {os.cpu_count()} cores, MLflow {mlflow.__version__}; {args.requests} one-digit "
          f"requests, {args.batches} of 256 digits per variant; one client, kept-alive connection")
    print("| variant | one digit p50 ms | p99 ms | digits/s at 256 | % of transport floor | log bytes/request |")
    print("|---|---|---|---|---|---|")
    for name, row in results.items():
        print(f"| {name} | {row['p50_ms']:.2f} | {row['p99_ms']:.2f} | {row['digits_per_s']:.0f} "
              f"| {100 * row['digits_per_s'] / floor:.0f}% | {row['log_bytes_per_request']:.0f} |")


if __name__ == "__main__":
    main()
