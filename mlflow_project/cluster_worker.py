"""`python -m mlflow_project.cluster_worker train|sweep ARGS`: the entry point of one container of a cluster.

The compose cluster (`make cluster-train`, `make cluster-sweep`; docker-compose.yml's `cluster` profile) and
the Kubernetes Jobs (deploy/kubernetes) start the same image with this entry point, so that both make the
worker's settings the same way:

- `train ARGS`: sets this worker's TF_CONFIG from the platform's WORKER_INDEX (or Kubernetes'
  JOB_COMPLETION_INDEX), NUM_WORKERS, WORKER_HOSTS and WORKER_PORT
  (`pipeline.training.cluster.platform_tf_config`), prints it, then becomes
  `python -m mlflow_project train --strategy multi_worker ARGS`.
- `sweep ARGS`: becomes `python -m mlflow_project sweep --storage $OPTUNA_STORAGE ARGS`: the study's
  database URL comes from the environment (a Secret, or compose from .env), never from a command line
  that a manifest, a Makefile or `ps` would show.

A missing or bad setting is one line, exit 2.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

STORAGE_VARIABLE = "OPTUNA_STORAGE"


def command(role: str, arguments: Sequence[str], environ: dict[str, str]) -> list[str]:
    """The command this container becomes, setting TF_CONFIG in `environ` for `train`.

    Raises:
        UserInputError: the role is unknown, or the environment does not say what the role needs.
    """
    from pipeline.errors import ParameterError
    from pipeline.training.cluster import TF_CONFIG, platform_tf_config

    base = [sys.executable, "-m", "mlflow_project"]
    if role == "train":
        environ[TF_CONFIG] = platform_tf_config(environ)
        return [*base, "train", "--strategy", "multi_worker", *arguments]
    if role == "sweep":
        storage = environ.get(STORAGE_VARIABLE, "").strip()
        if not storage:
            raise ParameterError(STORAGE_VARIABLE, storage, "the study database's URL, in the environment")
        return [*base, "sweep", "--storage", storage, *arguments]
    raise ParameterError("role", role, "train or sweep")


def main(arguments: Sequence[str]) -> None:
    from mlflow_project.common import one_line_errors

    role, *rest = arguments or [""]
    environ = dict(os.environ)
    with one_line_errors():
        argv = command(role, rest, environ)
    if role == "train":
        click.echo(f"TF_CONFIG={environ['TF_CONFIG']}")
    sys.stdout.flush()
    os.execve(sys.executable, argv, environ)


if __name__ == "__main__":
    main(sys.argv[1:])
