"""What every entry point shares: quiet startup, console logging, options, one-line failures."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import click

from pipeline.config import ParameterSpec
from pipeline.stop_request import request_stop, stop_requested

if TYPE_CHECKING:
    from pipeline.experiments.runs import Workspace

# TensorFlow's C++ start-up chatter and MLflow's INFO lines (creating tables, experiments) are not
# for users of the CLI; set before anything imports TensorFlow or MLflow. Users can override both.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
# MLflow's REST client retries an unreachable server for minutes per call (7 retries, doubling
# from 2 s). The pipeline's recorder retries on its own, in order, so each call gives up sooner.
os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
# MLflow's artifact download progress bars (a resume downloads the run's state) are not for the console either:
# a refused command prints one line.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's system metrics sample every 10 s by default: a 20-epoch training would get one or two.
os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "5")


def import_tensorflow_quietly() -> None:
    """Imports TensorFlow and Keras with their C++ start-up messages (oneDNN, CUDA probing on a
    machine without a GPU) kept off the console; they are shown only if the import fails.
    Keras' progress bars are turned off too: the pipeline logs its own lines."""
    saved_stderr = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            import keras
            import tensorflow as tf

            tf.config.list_physical_devices()  # device probing prints too; do it now
        except BaseException:
            os.dup2(saved_stderr, 2)
            captured.seek(0)
            sys.stderr.write(captured.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved_stderr, 2)
            os.close(saved_stderr)
    keras.utils.disable_interactive_logging()


def configure_console_logging(prefix: str = "") -> None:
    """The pipeline's log lines go to stdout as plain text (after `prefix`); library warnings stay on stderr."""
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(prefix.replace("%", "%%") + "%(message)s"))
    pipeline_logger = logging.getLogger("pipeline")
    pipeline_logger.handlers[:] = [handler]
    pipeline_logger.setLevel(logging.INFO)
    pipeline_logger.propagate = False


class _NoInterruptTraceback(logging.Filter):
    """Keeps a record's message but drops the traceback of a KeyboardInterrupt attached to it."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], KeyboardInterrupt):
            record.exc_info = record.exc_text = None
        return True


def no_interrupt_tracebacks(library: str) -> None:
    """A Ctrl-C or SIGTERM is a stop, not an error: the handlers of `library`'s root logger print the line it
    logs for one without the KeyboardInterrupt's traceback (Optuna logs one per interrupted trial)."""
    for handler in logging.getLogger(library).handlers:
        handler.addFilter(_NoInterruptTraceback())


def parameter_options(specs: Sequence[ParameterSpec]) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """click options for `specs`, all taken as text: parsing and checking happen in one place,
    `pipeline.config`, so the CLI and `mlflow run -P` report a bad value the same way."""

    def decorate(command: Callable[..., Any]) -> Callable[..., Any]:
        for spec in reversed(specs):
            # `mlflow run` passes a parameter the MLproject leaves out (an empty default) as `--name value`
            aliases = (spec.mlflow_run_flag,) if not spec.in_mlproject and spec.mlflow_run_flag != spec.cli_flag else ()
            command = click.option(
                spec.cli_flag,
                *aliases,
                spec.name,
                type=str,
                default=None,
                show_default=spec.default_text,
                help=f"{spec.help} Allowed: {spec.allowed}.",
            )(command)
        return command

    return decorate


def experiment_option(help_text: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """`--experiment-name`, a CLI-only option: under `mlflow run` the experiment is the run's own
    (`mlflow run --experiment-name`), so it is not an MLproject parameter."""
    return click.option("--experiment-name", default=None, help=help_text)


_CURRENT_EXPERIMENT_HELP = (
    "Experiment to act on (default: the current one: MLFLOW_EXPERIMENT_ID, set by `mlflow run`, "
    "else MLFLOW_EXPERIMENT_NAME, else MLflow's 'Default')."
)


def experiment_command(name: str, specs: Sequence[ParameterSpec]) -> Callable[[Callable[..., Any]], click.Command]:
    """A command that acts on an experiment's training runs (`register`, `compare`): its parameters
    as options, and `--experiment-name`."""

    def decorate(function: Callable[..., Any]) -> click.Command:
        return click.command(name)(parameter_options(specs)(experiment_option(_CURRENT_EXPERIMENT_HELP)(function)))

    return decorate


def open_experiment(
    specs: Sequence[ParameterSpec], values: dict[str, Any], run_type: str, experiment_name: str | None
) -> tuple[dict[str, Any], Workspace]:
    """An experiment command's parsed parameters, and its workspace (`pipeline.experiments.runs.open_workspace`)."""
    from pipeline.config import parse_parameters
    from pipeline.experiments.runs import open_workspace

    return parse_parameters(specs, given(values)), open_workspace(run_type, experiment_name)


def source_tags() -> dict[str, str]:
    """MLflow's source tags for a run this command creates through the client (which sets none), as
    `mlflow.start_run` sets them on a new run: this program, LOCAL, the git commit it was run from
    (when it is in a git work tree), the user. The UI's Source and User columns show them."""
    import getpass
    import subprocess

    program = os.path.abspath(sys.argv[0])
    tags = {"mlflow.source.name": program, "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(KeyError, OSError):  # no name for this uid (a container's)
        tags["mlflow.user"] = getpass.getuser()
    try:
        commit = subprocess.run(["git", "-C", os.path.dirname(program), "rev-parse", "HEAD"],
                                capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):  # no git, or it hangs
        return tags
    if commit.returncode == 0 and commit.stdout.strip():
        tags["mlflow.source.git.commit"] = commit.stdout.strip()
    return tags


def given(values: dict[str, Any]) -> dict[str, Any]:
    """The options the user actually gave (click passes None for the others)."""
    return {name: value for name, value in values.items() if value is not None}


@contextmanager
def one_line_errors() -> Iterator[None]:
    """Turns the pipeline's errors into one line on stderr and an exit status, no traceback.

    Bad input exits 2; a diverged training, an incomplete record or a lost worker exits 1. When `mlflow run`
    created a run for us and we fail before using it, the run is marked FAILED, never left RUNNING.
    """
    from mlflow.exceptions import MlflowException

    from pipeline.errors import (
        ClusterUnavailable,
        LocalStorageError,
        RecordingError,
        TrackingUnavailable,
        TrainingDiverged,
        UserInputError,
        first_line,
    )

    try:
        yield
    except (
        UserInputError, TrainingDiverged, RecordingError, TrackingUnavailable, LocalStorageError, ClusterUnavailable
    ) as error:
        _fail_project_run()
        click.echo(f"error: {error}", err=True)
        sys.exit(error.exit_code)
    except MlflowException as error:  # the tracking store failed in a way the pipeline does not handle
        _fail_project_run()
        click.echo(f"error: the tracking store failed: {first_line(error, 300)}", err=True)
        sys.exit(1)


def _fail_project_run() -> None:
    run_id = os.environ.get("MLFLOW_RUN_ID")
    if not run_id:
        return
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    try:
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, "FAILED")
    except Exception:  # noqa: BLE001 - the store may be the thing that failed
        pass


def _drop_a_requested_interrupt(
    previous: Callable[[Any], object],
) -> Callable[[Any], object]:
    """An unraisable-exception hook that drops the KeyboardInterrupt of a stop already requested: the
    handler's exception, raised inside a finalizer, is lost (the stop request is not), and Python would
    print it as "Exception ignored in ..." with a traceback. Any other exception goes to `previous`."""

    def hook(unraisable: Any) -> None:
        if isinstance(unraisable.exc_value, KeyboardInterrupt) and stop_requested():
            logging.getLogger(__name__).debug("the interrupt was raised inside a finalizer; the stop request stays")
            return
        previous(unraisable)

    return hook


def stop_on_first_signal() -> bool:
    """The first SIGINT or SIGTERM raises KeyboardInterrupt (which stops the command), any later one is
    ignored (so that a second Ctrl-C cannot cut the clean-up short). Returns whether Ctrl-C reaches this
    process: not when it was started with SIGINT ignored, as a background job of a non-interactive shell
    is (Ctrl-C at that terminal is not meant for it)."""
    stopping = False

    def interrupt(signal_number: int, frame: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            request_stop()  # kept: the KeyboardInterrupt may be dropped (see pipeline.stop_request)
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)
    sys.unraisablehook = _drop_a_requested_interrupt(sys.unraisablehook)
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        return False
    signal.signal(signal.SIGINT, interrupt)
    return True
