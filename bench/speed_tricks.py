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
- exit: a 1-epoch `train` through the CLI; the time from the command's return to the end of the
  process, leaving with `os._exit` (as `mlflow_project/__main__.py` does) against a normal exit.

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

    if mode in TRICKS["exit"]:
        _train_and_exit(mode, workdir, dataset)
    data = load_dataset(dataset)
    mlflow.set_tracking_uri(f"sqlite:///{workdir / 'mlflow.db'}")
    client = MlflowClient()
    if mode == "prepare":
        return _prepare(workdir, data)
    from pipeline.tracking.model_logging import MODEL_REQUIREMENTS, MODEL_SIGNATURE, log_model
    from pipeline.tracking.recorder import RunRecorder

    model = keras.models.load_model(workdir / "best.keras")
    example = data.x_test[:5]
    requirements = [f"{package}=={metadata.version(package)}" for package in MODEL_REQUIREMENTS]
    with mlflow.start_run() as run, RunRecorder(client, run.info.run_id, workdir / "staging") as recorder:
        if mode == "flavor":
            def shipped():
                log_model(recorder, model, example, workdir, deadline=float("inf"))

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
        _after_fit(mode == TRICKS["plots"][0], workdir, data, history,
                   log=lambda best: log_model(recorder, best, example, workdir, deadline=float("inf")))
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


def _after_fit(in_plot_process: bool, workdir: Path, data, history: list[dict], log) -> None:
    """evaluate_and_report's work, with the plots in a PlotProcess or in this process."""
    import keras

    from pipeline.tracking import reporting
    from pipeline.tracking.plot_process import PlotProcess
    from pipeline.training.evaluation import categorical_loss_and_accuracy, predict_probabilities

    def evaluate():
        best = keras.models.load_model(workdir / "best.keras")
        probabilities = predict_probabilities(best, data.x_test)
        categorical_loss_and_accuracy(data.y_test, probabilities)
        return best, reporting.confusion_matrix(data.y_test.argmax(axis=1), probabilities.argmax(axis=1))

    curves, matrix = workdir / "curves.png", workdir / "matrix.png"
    if in_plot_process:
        with PlotProcess() as plotter:
            plotter.submit("plot_training_curves", history, [], 10, curves)
            best, counts = evaluate()
            plotter.submit("plot_confusion_matrix", counts, matrix)
            log(best)
    else:
        reporting.plot_training_curves(history, [], 10, curves)
        best, counts = evaluate()
        reporting.plot_confusion_matrix(counts, matrix)
        log(best)


def _train_and_exit(mode: str, workdir: Path, dataset: str) -> None:
    """Never returns: trains through the CLI, writes when the command returned, and leaves."""
    import logging

    from mlflow_project.cli import cli

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{workdir / 'exit.db'}"
    try:
        cli.main(["train", "--epochs", "1", "--dataset", dataset], standalone_mode=True)
    except SystemExit as request:
        code = request.code if isinstance(request.code, int) else 1
    (workdir / "returned").write_text(repr(time.time()))
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if mode == TRICKS["exit"][0]:
        os._exit(code)
    sys.exit(code)


def _run_child(mode: str, workdir: Path, dataset: str, repeats: int) -> dict[str, list[float]]:
    command = [sys.executable, __file__, "--child", mode, "--workdir", str(workdir), "--dataset", dataset,
               "--repeats", str(repeats)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=workdir,
                            env={**os.environ, "PYTHONPATH": str(PROJECT_DIR)})
    ended = time.time()
    if result.returncode != 0:
        raise SystemExit(f"{mode} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    if mode in TRICKS["exit"]:
        return {mode: [ended - float((workdir / "returned").read_text())]}
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
            for mode in (*TRICKS["plots"], *TRICKS["exit"]):
                for variant, values in _run_child(mode, workdir, dataset, 1).items():
                    samples.setdefault(variant, []).extend(values)
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
