"""The team tracking server's web app: MLflow's basic-auth app, with every artifact byte through the server.

With an S3 artifact store, MLflow's server advertises multipart (presigned) transfers in
`/mlflow/server-info`, and clients then fetch artifacts from presigned URLs on the object store's own
address: inside the compose network that is `objectstore:8333`, which no host or teammate can reach,
so their model loads retry for ever. The server cannot be told not to advertise it; this app answers
`server-info` with both capabilities off, so every client, with default settings, downloads and
uploads through the server, which holds the store's keys. The start script runs it as
`mlflow server --app-name proxied-basic-auth` (an `mlflow.app` entry point of this package).

A download of an artifact that does not exist answers 404 RESOURCE_DOES_NOT_EXIST, as MLflow's server
does with a local artifact directory. With S3 it answers 500 (S3's 404 wrapped as an internal error),
and clients retry a 500 for about 4 minutes (MLFLOW_HTTP_REQUEST_MAX_RETRIES=7, backoff factor 2):
that is what `runs:/<run id>/model` asks first, for the run artifact `model` MLflow 3 no longer writes
(the model is a LoggedModel), before it falls back to the run's logged model. A 500 of a download is
turned into the 404 only when the store, asked again, lists no such file; any other 500 (the store
unreachable) stays what it is, and is worth retrying.

Read-only accounts (MLFLOW_READ_ONLY_USERS, comma-separated; the start script adds the serving account)
get 403 PERMISSION_DENIED on every request that could write: MLflow lets every signed-in user create
experiments, registered models, prompts and more, whatever their grants. A request is a read when its
method is GET, HEAD or OPTIONS, or when it is one of the search calls MLflow's clients send as POST
(READ_ONLY_POSTS); everything else is refused before MLflow sees it.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import posixpath
import re

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST
from mlflow.server import ARTIFACTS_DESTINATION_ENV_VAR
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.utils.server_info import (
    SERVER_INFO_MULTIPART_DOWNLOADS_ENABLED,
    SERVER_INFO_MULTIPART_UPLOADS_ENABLED,
)
from starlette.concurrency import run_in_threadpool
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

logger = logging.getLogger(__name__)

SERVER_INFO_PATH = "/mlflow/server-info"
DIRECT_TRANSFERS = (SERVER_INFO_MULTIPART_DOWNLOADS_ENABLED, SERVER_INFO_MULTIPART_UPLOADS_ENABLED)
# The proxied artifact download (REST API and the UI's ajax API); PATH is relative to the destination.
ARTIFACT_DOWNLOAD = re.compile(r"/(?:ajax-)?api/2\.0/mlflow-artifacts/artifacts/(?P<path>.+)")
READ_ONLY_USERS_ENV = "MLFLOW_READ_ONLY_USERS"
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The reads MLflow's clients and UI send as POST (a search body can be long).
READ_ONLY_POSTS = re.compile(
    r"/(?:ajax-)?api/[23]\.0/mlflow/(?:runs|experiments|logged-models|traces)/search"
    r"|/ajax-api/2\.0/mlflow/metrics/get-history-bulk-interval"
)


def create_app():
    """MLflow's basic-auth app (run by uvicorn, as `mlflow server` does) that advertises no direct transfers
    and answers a download of a missing artifact with 404."""
    from mlflow.server.auth import create_app as create_basic_auth_app

    app = create_basic_auth_app()
    app.add_middleware(BaseHTTPMiddleware, dispatch=_missing_artifact_not_found)
    read_only = read_only_users()
    if read_only:
        logger.info("Read-only accounts (every write refused): %s", ", ".join(sorted(read_only)))
        app.add_middleware(BaseHTTPMiddleware, dispatch=_refuse_writes_of(read_only))
    app.add_middleware(BaseHTTPMiddleware, dispatch=_without_direct_transfers)
    return app


def read_only_users() -> frozenset[str]:
    return frozenset(filter(None, (name.strip() for name in os.environ.get(READ_ONLY_USERS_ENV, "").split(","))))


def _basic_auth_username(request: Request) -> str | None:
    scheme, _, credentials = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "basic":
        return None
    try:
        return base64.b64decode(credentials, validate=True).decode().partition(":")[0]
    except (binascii.Error, UnicodeDecodeError):
        return None


def is_write(method: str, path: str) -> bool:
    """Whether a request with this method and path could change anything on the server."""
    return method not in READ_METHODS and not (method == "POST" and READ_ONLY_POSTS.fullmatch(path))


def _refuse_writes_of(read_only: frozenset[str]):
    async def refuse_writes(request: Request, call_next) -> Response:
        if is_write(request.method, request.url.path) and _basic_auth_username(request) in read_only:
            denied = {"error_code": "PERMISSION_DENIED",
                      "message": "Permission denied: this account is read-only (MLFLOW_READ_ONLY_USERS)"}
            return Response(json.dumps(denied), status_code=403, media_type="application/json")
        return await call_next(request)

    return refuse_writes


async def _missing_artifact_not_found(request: Request, call_next) -> Response:
    response = await call_next(request)
    download = ARTIFACT_DOWNLOAD.fullmatch(request.url.path)
    if response.status_code != 500 or request.method != "GET" or download is None:
        return response
    path = download["path"]
    if await run_in_threadpool(_stored_file_exists, path) is not False:
        return response
    async for _ in response.body_iterator:  # the 500's body, not sent
        pass
    missing = MlflowException(f"No such artifact: '{path}'", error_code=RESOURCE_DOES_NOT_EXIST)
    return Response(missing.serialize_as_json(), status_code=missing.get_http_status_code(),
                    media_type="application/json")


def _stored_file_exists(path: str) -> bool | None:
    """Whether the artifact store lists the file `path` (relative to the server's artifact destination);
    None when the store cannot be asked."""
    parent, name = posixpath.split(path)
    try:
        listing = get_artifact_repository(os.environ[ARTIFACTS_DESTINATION_ENV_VAR]).list_artifacts(parent or None)
    except Exception as error:  # noqa: BLE001 - the store's own error stays the answer
        logger.warning("Could not list %s in the artifact store: %s", parent, error)
        return None
    return any(posixpath.basename(entry.path) == name for entry in listing)


async def _without_direct_transfers(request: Request, call_next) -> Response:
    response = await call_next(request)
    if not request.url.path.endswith(SERVER_INFO_PATH) or response.status_code != 200:
        return response
    info = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
    info.update(dict.fromkeys(DIRECT_TRANSFERS, False))
    headers = {name: value for name, value in response.headers.items() if name.lower() != "content-length"}
    return Response(json.dumps(info), status_code=200, headers=headers, media_type="application/json")
