"""The team tracking server's web app: MLflow's basic-auth app, with every artifact byte through the server.

With an S3 artifact store, MLflow's server advertises multipart (presigned) transfers in
`/mlflow/server-info`, and clients then fetch artifacts from presigned URLs on the object store's own
address: inside the compose network that is `objectstore:8333`, which no host or teammate can reach,
so their model loads retry for ever. The server cannot be told not to advertise it; this app answers
`server-info` with both capabilities off, so every client, with default settings, downloads and
uploads through the server, which holds the store's keys. The start script runs it as
`mlflow server --app-name proxied-basic-auth` (an `mlflow.app` entry point of this package).
"""

from __future__ import annotations

import json

from mlflow.utils.server_info import (
    SERVER_INFO_MULTIPART_DOWNLOADS_ENABLED,
    SERVER_INFO_MULTIPART_UPLOADS_ENABLED,
)
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.requests import Request
from starlette.responses import Response

SERVER_INFO_PATH = "/mlflow/server-info"
DIRECT_TRANSFERS = (SERVER_INFO_MULTIPART_DOWNLOADS_ENABLED, SERVER_INFO_MULTIPART_UPLOADS_ENABLED)


def create_app():
    """MLflow's basic-auth app (run by uvicorn, as `mlflow server` does) that advertises no direct transfers."""
    from mlflow.server.auth import create_app as create_basic_auth_app

    app = create_basic_auth_app()
    app.add_middleware(BaseHTTPMiddleware, dispatch=_without_direct_transfers)
    return app


async def _without_direct_transfers(request: Request, call_next) -> Response:
    response = await call_next(request)
    if not request.url.path.endswith(SERVER_INFO_PATH) or response.status_code != 200:
        return response
    info = json.loads(b"".join([chunk async for chunk in response.body_iterator]))
    info.update(dict.fromkeys(DIRECT_TRANSFERS, False))
    headers = {name: value for name, value in response.headers.items() if name.lower() != "content-length"}
    return Response(json.dumps(info), status_code=200, headers=headers, media_type="application/json")
