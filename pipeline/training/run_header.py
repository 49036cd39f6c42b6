"""A training run's header: params, tags and the training data as an MLflow dataset input, logged
before training starts."""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import mlflow
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.tracking.retry import is_transient, retry
from pipeline.training.data import ImageDataset


def log_run_header(client: MlflowClient, run_id: str, params: Mapping[str, str], dataset: ImageDataset) -> None:
    """Params, tags and the dataset input, before training starts (synchronously: a store that
    cannot take these should stop the run before any training)."""
    # `mlflow run` has already logged the entry point's parameters as the user typed them
    # ("1e-3"); MLflow refuses to change a param, so only the missing ones are added.
    existing = client.get_run(run_id).data.params
    mlflow.log_params({key: value for key, value in params.items() if key not in existing})
    mlflow.set_tags({names.TAG_RUN_TYPE: names.RUN_TYPE_TRAINING, names.TAG_DATASET_DIGEST: dataset.digest})
    input_dataset = _mlflow_dataset(dataset)
    retry(lambda: mlflow.log_input(input_dataset, context=names.DATASET_CONTEXT_TRAINING), attempts=3,
          retry_if=lambda error: is_transient(error) or lost_dataset_race(error))


def lost_dataset_race(error: Exception) -> bool:
    """True when the store refused a dataset input because another run created the same dataset entity
    between its check and its insert: runs starting together on one dataset race there. PostgreSQL
    answers a unique violation on `dataset_pk` (HTTP 400 from a server), SQLite a failed UNIQUE
    constraint on `datasets`; a second attempt finds the entity and links it."""
    if not isinstance(error, MlflowException):
        return False
    message = str(error)
    return ("dataset_pk" in message and "duplicate key" in message) or "UNIQUE constraint failed: datasets." in message


def _mlflow_dataset(dataset: ImageDataset) -> mlflow.data.Dataset:
    from mlflow.data.http_dataset_source import HTTPDatasetSource

    source = HTTPDatasetSource(dataset.source) if dataset.source.startswith("http") else dataset.source
    with warnings.catch_warnings():
        # MLflow registers its local-file source twice and warns that a path is ambiguous.
        warnings.filterwarnings("ignore", message="The specified dataset source can be interpreted")
        return mlflow.data.from_numpy(
            dataset.x_train, targets=dataset.y_train, source=source, name=dataset.name, digest=dataset.digest
        )
