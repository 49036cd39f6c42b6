"""The champion to serve: which registered version the `champion` alias points at, waited for.

The compose `serve` service runs `python -m mlflow_project serve`, which waits here until the
registered model has a champion and then serves that version. It serves a fixed version, read at
start: moving the alias reaches it by a restart (`docker compose --profile serve restart serve`),
so what answers is always one known version, never a half-reloaded one.
"""

from __future__ import annotations

import io
import json
import logging
import time
from collections.abc import Callable

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline.constants import CHAMPION_ALIAS
from pipeline.experiments.registry import champion_version

_log = logging.getLogger(__name__)

# The two request formats docs/team-server.md shows for `/invocations`: JSON for a digit or a few, Parquet for
# batches (MLflow's server parses a JSON body twice and copies it; bench/RESULTS.md, "The served champion").
JSON_CONTENT_TYPE = "application/json"
PARQUET_CONTENT_TYPE = "application/vnd.apache.parquet"


def request_body(rows, content_type: str) -> bytes:
    """`rows` (float32, one row of 784 pixels per digit) as a `/invocations` body in `content_type`:
    `{"inputs": [[...], ...]}`, or a Parquet table of 784 float32 columns named "0".."783"."""
    if content_type == JSON_CONTENT_TYPE:
        return json.dumps({"inputs": rows.tolist()}).encode()
    import pandas as pd

    body = io.BytesIO()
    pd.DataFrame(rows).rename(columns=str).to_parquet(body)
    return body.getvalue()


def champion_alias_uri(model_name: str) -> str:
    """`models:/<name>@champion`: the URI teammates load the champion by."""
    return f"models:/{model_name}@{CHAMPION_ALIAS}"


def wait_for_champion(
    client: MlflowClient, model_name: str, poll_seconds: float, sleep: Callable[[float], None] = time.sleep
) -> str:
    """The URI of the version the champion alias points at (`models:/<name>/<version>`), waiting
    for one while the model or its alias does not exist yet; says so once, in one line."""
    said = False
    while True:
        version = _champion_or_none(client, model_name)
        if version is not None:
            return f"models:/{model_name}/{version}"
        if not said:
            _log.info(
                "No champion yet: %s does not exist; waiting for `register` to set it (checking every %g s)",
                champion_alias_uri(model_name), poll_seconds,
            )
            said = True
        sleep(poll_seconds)


def _champion_or_none(client: MlflowClient, model_name: str) -> str | None:
    try:
        return champion_version(client, model_name)
    except MlflowException as error:  # the registered model does not exist yet
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return None
