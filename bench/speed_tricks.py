"""What each of the pipeline's three speed tricks buys: the same work measured with and without it.

    .venv/bin/python bench/speed_tricks.py --dataset ../shared/data/fashion-mnist --repeats 5

- flavor: the model logged as shipped (`pipeline.tracking.model_logging.log_model`: `Model.log` with
  a stand-in flavor and `validate_serving_input=False`) against `mlflow.tensorflow.log_model` with
  the same signature, input example and requirements, which loads the saved model back to predict
  the example. Alternated in one process on a SQLite store, after one warm-up of each.
- plots: the work after `fit` (load the best checkpoint, predict the test split, draw the training
  curves and the confusion matrix, log the model) with the plots drawn by a `PlotProcess`, as
  shipped, against drawing them in the training process. Each sample is a fresh process that has
  imported what the training process has when `fit` ends.
- exit: a 1-epoch `train`; the time from its last console line to the end of the process, through
  `python -m mlflow_project` (as shipped: `os._exit`) against calling the same click group in a
  plain `python -c` (a normal exit).

The checkpoint and history these use come from one real 20-epoch fit at the start. Prints a
markdown table of medians (min-max); `--output` writes it too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT_DIR = Path(__file__).resolve().parents[1]
TRICKS = {  # trick: (variant as shipped, variant without the trick)
    "flavor": ("stand-in flavor", "mlflow.tensorflow.log_model"),
    "plots": ("PlotProcess", "plots in process"),
    "exit": ("os._exit", "normal exit"),
}


def _child(mode: str, workdir: Path, dataset: str, repeats: int) -> dict[str, list[float]]:
    """Runs in a fresh process; returns seconds per variant."""
    from importlib import metadata

    import keras
    import mlflow
    from mlflow.tracking import MlflowClient

    from pipeline import constants as names
    from pipeline.training.data import load_dataset

    data = load_dataset(dataset)
    if mode == "prepare":
        return _prepare(workdir, data)
    from pipeline.tracking.model_logging import MODEL_REQUIREMENTS, MODEL_SIGNATURE, log_model
    from pipeline.tracking.recorder import RunRecorder

    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = MlflowClient()
    model = keras.models.load_model(workdir / "best.keras")
    example = data.x_test[:5]
    requirements = [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS]
    with mlflow.start_run() as run, RunRecorder(client, run.info.run_id, workdir / "staging") as recorder:
        def shipped(best=model):
            log_model(recorder, best, example, workdir, deadline=float("inf"))

        if mode == "flavor":
            def plain():
                mlflow.tensorflow.log_model(model, name=names.MODEL_NAME, signature=MODEL_SIGNATURE,
                                            input_example=example, pip_requirements=requirements)
            times = {TRICKS["flavor"][0]: [], TRICKS["flavor"][1]: []}
            for _ in range(repeats + 1):  # the first round warms both up
                for variant, function in zip(TRICKS["flavor"], (shipped, plain), strict=True):
                    started = time.perf_counter()
                    function()
                    times[variant].append(time.perf_counter() - started)
            return {variant: values[1:] for variant, values in times.items()}
        history = json.loads((workdir / "history.json").read_text())
        started = time.perf_counter()
        _after_fit(mode == TRICKS["plots"][0], workdir, data, history, log=shipped)
        seconds = time.perf_counter() - started
    return {mode: [seconds]}


def _prepare(workdir: Path, data) -> dict[str, list[float]]:
    import keras

    from pipeline.training.model import build_model

    keras.utils.set_random_seed(42)
    model = build_model((128, 64), 0.2, 0.001, steps_per_execution=64)
    history = model.fit(
        data.x_train, data.y_train, validation_split=0.2, epochs=20, batch_size=128, verbose=0,
        callbacks=[keras.callbacks.ReduceLROnPlateau(factor=0.5, patience=2, min_lr=1e-6)],
    ).history
    model.save(workdir / "best.keras")
    rows = [{key: float(values[epoch]) for key, values in history.items()} for epoch in range(len(history["loss"]))]
    (workdir / "history.json").write_text(json.dumps(rows))
    return {}


class _PlotsInProcess:
    """PlotProcess's interface, drawing each plot at once in this process."""

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        pass

    def submit(self, function: str, *args) -> None:
        from pipeline.tracking import reporting

        getattr(reporting, function)(*args)


def _after_fit(in_plot_process: bool, workdir: Path, data, history: list[dict], log) -> None:
    """evaluate_and_report's sequence (pipeline/training/evaluation.py), the plots drawn by a
    PlotProcess or in this process."""
    import keras

    from pipeline.tracking import reporting
    from pipeline.tracking.plot_process import PlotProcess
    from pipeline.training.evaluation import categorical_loss_and_accuracy, predict_probabilities

    with PlotProcess() if in_plot_process else _PlotsInProcess() as plotter:
        plotter.submit("plot_training_curves", history, [], 10, workdir / "curves.png")
        best = keras.models.load_model(workdir / "best.keras")
        probabilities = predict_probabilities(best, data.x_test)
        categorical_loss_and_accuracy(data.y_test, probabilities)
        counts = reporting.confusion_matrix(data.y_test.argmax(axis=1), probabilities.argmax(axis=1))
        plotter.submit("plot_confusion_matrix", counts, workdir / "matrix.png")
        log(best)


_NORMAL_EXIT = "import sys; from mlflow_project.cli import cli; cli(sys.argv[1:])"


def _teardown_seconds(mode: str, workdir: Path, dataset: str) -> float:
    """A 1-epoch `train`; seconds from its last console line to the end of its process."""
    start = ["-m", "mlflow_project"] if mode == TRICKS["exit"][0] else ["-c", _NORMAL_EXIT]
    command = [sys.executable, *start, "train", "--epochs", "1", "--dataset", dataset]
    store = f"sqlite:///{workdir / 'exit.db'}"
    environment = {**os.environ, "PYTHONPATH": str(PROJECT_DIR), "MLFLOW_TRACKING_URI": store}
    process = subprocess.Popen(command, cwd=workdir, env=environment, stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True)
    last_line = time.perf_counter()
    for _ in process.stdout:
        last_line = time.perf_counter()
    if process.wait() != 0:
        raise SystemExit(f"{mode} failed ({process.returncode})")
    return time.perf_counter() - last_line


def _run_child(mode: str, workdir: Path, dataset: str, repeats: int) -> dict[str, list[float]]:
    command = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--dataset", dataset,
               "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    arguments = parser.parse_args()
    dataset = str(Path(arguments.dataset).resolve())
    if arguments.child:
        print(json.dumps(_child(arguments.child, arguments.workdir, dataset, arguments.repeats)))
        return
    samples: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-tricks-") as directory:
        workdir = Path(directory)
        _run_child("prepare", workdir, dataset, 0)
        samples |= _run_child("flavor", workdir, dataset, arguments.repeats)
        for _ in range(arguments.repeats):  # alternating, so that drift hits both alike
            for mode in TRICKS["plots"]:
                samples.setdefault(mode, []).extend(_run_child(mode, workdir, dataset, 1)[mode])
            for mode in TRICKS["exit"]:
                samples.setdefault(mode, []).append(_teardown_seconds(mode, workdir, dataset))
    lines = ["| trick | as shipped | without it | bought |", "| --- | --- | --- | --- |"]
    def cell(variant: str) -> str:
        values = samples[variant]
        return f"{variant}: {statistics.median(values):.2f} s ({min(values):.2f}-{max(values):.2f})"

    for trick, (shipped, plain) in TRICKS.items():
        bought = statistics.median(samples[plain]) - statistics.median(samples[shipped])
        lines.append(f"| {trick} | {cell(shipped)} | {cell(plain)} | {bought:.2f} s |")
    text = "\n".join(lines)
    print(text)
    if arguments.output:
        arguments.output.write_text(text + "\n")


if __name__ == "__main__":
    main()
