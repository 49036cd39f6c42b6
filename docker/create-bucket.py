#!/usr/bin/env python3
"""Creates the artifact bucket on the S3 object store, once: when it exists, nothing happens.

docker-compose.yml runs it as a one-shot job; the MLflow server starts only after it succeeded.
Settings come from the environment: MLFLOW_S3_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION and S3_BUCKET. While the store is still starting
(no connection, HTTP 5xx) it tries again for up to CREATE_BUCKET_TIMEOUT seconds (default 60); a
refusal (wrong keys) fails at once. Exit status 0 when the bucket is there, 1 otherwise.
"""

from __future__ import annotations

import os
import sys
import time

import boto3
from botocore.config import Config
from botocore.exceptions import BotoCoreError, ClientError

MISSING = ("404", "NoSuchBucket", "NotFound")
ALREADY_THERE = ("BucketAlreadyOwnedByYou", "BucketAlreadyExists")


def ensure_bucket(s3, bucket: str) -> str:
    """Creates `bucket` unless it exists; says which happened."""
    try:
        s3.head_bucket(Bucket=bucket)
        return f"bucket {bucket} exists"
    except ClientError as error:
        if error.response["Error"]["Code"] not in MISSING:
            raise
    try:
        s3.create_bucket(Bucket=bucket)
    except ClientError as error:
        if error.response["Error"]["Code"] not in ALREADY_THERE:
            raise
        return f"bucket {bucket} exists"
    return f"bucket {bucket} created"


def _retryable(error: Exception) -> bool:
    if isinstance(error, ClientError):
        return error.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) >= 500
    return True  # no connection yet, or a timeout


def main() -> int:
    bucket = os.environ["S3_BUCKET"]
    endpoint = os.environ["MLFLOW_S3_ENDPOINT_URL"]
    s3 = boto3.client(
        "s3",
        endpoint_url=endpoint,
        config=Config(s3={"addressing_style": "path"}, connect_timeout=5, retries={"max_attempts": 1}),
    )
    deadline = time.monotonic() + float(os.environ.get("CREATE_BUCKET_TIMEOUT", "60"))
    while True:
        try:
            print(ensure_bucket(s3, bucket))
            return 0
        except (BotoCoreError, ClientError) as error:
            if not _retryable(error) or time.monotonic() >= deadline:
                print(f"error: cannot create bucket {bucket} at {endpoint}: {error}", file=sys.stderr)
                return 1
            time.sleep(2)


if __name__ == "__main__":
    sys.exit(main())
