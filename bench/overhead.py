"""What full MLflow recording costs: plain Keras vs our pipeline (SQLite store and a real tracking
server) vs mlflow.tensorflow.autolog(), on the same data, model, callbacks, seed and epochs.

    .venv/bin/python bench/overhead.py --dataset ../shared/data/fashion-mnist --epochs 5 20 --repeats 3

Each variant is a fresh process, measured from the outside, and the variants alternate within each
repetition so that drift in the machine's speed hits all of them alike:

1. plain   - bench/keras_baselines.py plain: the seed's callbacks, best checkpoint evaluated on test.
   plain_spe - the same with the pipeline's default steps_per_execution: the ratios to it are what
             the recording itself costs (the ratios to plain include the faster loop).
2. local   - `mlflow run . --env-manager local` recording to a SQLite store.
3. server  - the same against a real `mlflow server` (PostgreSQL backend when one answers on
             127.0.0.1:5432, proxied artifacts, basic auth), started by the native launcher.
4. autolog - bench/keras_baselines.py autolog: mlflow.tensorflow.autolog(checkpoint=True), SQLite.

Per run: fit time and after-fit time (from the `Timing:` line each variant prints), whole-process wall
time, time to the first epoch's console line, peak RSS of the process tree (wait4's ru_maxrss), test
accuracy. Prints a markdown table of medians (min-max) and ratios to plain; `--output` writes it too.
Needs `pip install tensorboard` for the autolog variant (MLflow's autolog imports it).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
TIMING = re.compile(r"Timing: fit ([\d.]+) s, after fit ([\d.]+) s")
ACCURACY = re.compile(r"[Tt]est[ _]accuracy[ =:of the best checkpoint]*[=: ]\s*([\d.]+)")
VARIANTS = ("plain", "plain_spe", "local", "server", "autolog")


def measure(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, float]:
    """Runs one variant; returns its measurements."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    first_epoch = None
    output = []
    for line in process.stdout:
        output.append(line)
        if first_epoch is None and line.startswith("Epoch 1:"):
            first_epoch = time.perf_counter() - started
    stderr = process.stderr.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    text = "".join(output)
    timing = TIMING.search(text)
    if process.returncode != 0 or timing is None:
        raise RuntimeError(f"{command} failed ({process.returncode}):\n{text[-2000:]}\n{stderr[-3000:]}")
    accuracy = ACCURACY.findall(text)
    return {
        "fit": float(timing.group(1)),
        "after_fit": float(timing.group(2)),
        "wall": wall,
        "first_epoch": first_epoch or float("nan"),
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "test_accuracy": float(accuracy[-1]) if accuracy else float("nan"),
    }


def command_for(variant: str, epochs: int, dataset: str) -> list[str]:
    if variant in ("plain", "plain_spe", "autolog"):
        return [sys.executable, str(PROJECT_DIR / "bench" / "keras_baselines.py"), variant, str(epochs), dataset]
    return [
        str(Path(sys.executable).parent / "mlflow"), "run", str(PROJECT_DIR), "--env-manager", "local",
        "-P", f"epochs={epochs}", "-P", f"dataset={dataset}",
    ]


@contextlib.contextmanager
def tracking_server(workdir: Path) -> Iterator[dict[str, str]]:
    """A real tracking server from the project's native launcher; yields the client environment."""
    from pipeline.tracking.server import TrackingServer

    with TrackingServer(workdir / "server") as server:
        yield server.client_environment()


def summarize(samples: list[dict[str, float]], key: str) -> tuple[float, float, float]:
    values = [sample[key] for sample in samples]
    return statistics.median(values), min(values), max(values)


def table(results: dict[tuple[str, int], list[dict[str, float]]], epochs_list: list[int]) -> str:
    keys = (("fit", "s"), ("after_fit", "s"), ("wall", "s"), ("first_epoch", "s"), ("peak_rss_mb", "MB"))
    lines = [
        "| epochs | variant | fit | after fit | whole process | first epoch | peak RSS | test acc "
        "| fit / plain | wall / plain | RSS / plain | fit / plain_spe | wall / plain_spe |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for epochs in epochs_list:
        plain = results.get(("plain", epochs))
        plain_spe = results.get(("plain_spe", epochs))
        for variant in VARIANTS:
            samples = results.get((variant, epochs))
            if not samples:
                continue
            cells = []
            for key, unit in keys:
                median, low, high = summarize(samples, key)
                cells.append(f"{median:.2f} {unit} ({low:.2f}-{high:.2f})")
            accuracy = statistics.median(sample["test_accuracy"] for sample in samples)
            ratios = []
            for reference, key in ((plain, "fit"), (plain, "wall"), (plain, "peak_rss_mb"), (plain_spe, "fit"),
                                   (plain_spe, "wall")):
                ratio = summarize(samples, key)[0] / summarize(reference, key)[0] if reference else None
                ratios.append(f"{ratio:.3f}" if ratio else "-")
            row = [str(epochs), variant, *cells, f"{accuracy:.4f}", *ratios]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def machine() -> str:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")),
        platform.processor(),
    )
    return f"{os.cpu_count()} cores, {model}, Python {platform.python_version()}, {platform.platform()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="an .npz or IDX directory (e.g. ../shared/data/fashion-mnist)")
    parser.add_argument("--epochs", type=int, nargs="+", default=[5, 20])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1, help="discarded runs of each variant first (cold caches)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--output", type=Path, help="also write the markdown table here")
    args = parser.parse_args()
    if "autolog" in args.variants and importlib.util.find_spec("tensorboard") is None:
        parser.error("the autolog variant needs tensorboard (MLflow's autolog imports it): pip install tensorboard")
    dataset = str(Path(args.dataset).resolve())
    results: dict[tuple[str, int], list[dict[str, float]]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        workdir = Path(tmp)
        base_env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
        base_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{base_env.get('PATH', '')}"
        base_env["PYTHONPATH"] = str(PROJECT_DIR)
        local_env = base_env | {"MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'local.db'}"}
        with contextlib.ExitStack() as stack:
            server_env = base_env | stack.enter_context(tracking_server(workdir)) if "server" in args.variants else {}
            envs = {"plain": base_env, "plain_spe": base_env, "local": local_env, "server": server_env,
                    "autolog": local_env}
            for _ in range(args.warmup):
                for variant in args.variants:
                    measure(command_for(variant, min(args.epochs), dataset), envs[variant], workdir)
            for repeat in range(args.repeats):
                for epochs in args.epochs:
                    for variant in args.variants:
                        sample = measure(command_for(variant, epochs, dataset), envs[variant], workdir)
                        results.setdefault((variant, epochs), []).append(sample)
                        print(f"repeat {repeat + 1} epochs {epochs} {variant}: "
                              + ", ".join(f"{k}={v:.2f}" for k, v in sample.items()), flush=True)
    report = (
        f"Machine: {machine()}\n\nDataset: {args.dataset}; {args.warmup} discarded warm-up run(s) of each variant, "
        f"then {args.repeats} repetitions, variants alternating; medians (min-max).\n\n{table(results, args.epochs)}\n"
    )
    print("\n" + report)
    if args.output:
        args.output.write_text(report)


if __name__ == "__main__":
    main()
