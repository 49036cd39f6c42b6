"""The retry rule (pipeline.tracking.retry): which errors are worth another attempt, the pauses between
attempts, and how many attempts are made. Pure functions, driven directly: no store, no sleep longer
than a few milliseconds."""

from __future__ import annotations

import errno
import logging
import random
import time

import pytest
import sqlalchemy.exc
import urllib3.exceptions
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    ALREADY_EXISTS,
    BAD_REQUEST,
    CANCELLED,
    INTERNAL_ERROR,
    INVALID_PARAMETER_VALUE,
    NOT_IMPLEMENTED,
    PERMISSION_DENIED,
    REQUEST_LIMIT_EXCEEDED,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
    UNAUTHENTICATED,
)

from pipeline.tracking.retry import Backoff, is_transient, remaining, retry

pytestmark = pytest.mark.timeout(30)


def _mlflow_error(code: int) -> MlflowException:
    return MlflowException("refused", error_code=code)


@pytest.mark.parametrize(
    ("code", "transient"),
    [
        (INTERNAL_ERROR, True),  # 500
        (NOT_IMPLEMENTED, True),  # 501
        (TEMPORARILY_UNAVAILABLE, True),  # 503
        (REQUEST_LIMIT_EXCEEDED, True),  # 429
        (CANCELLED, False),  # 499: just below the 5xx
        (ALREADY_EXISTS, False),  # 409: next to 408
        (RESOURCE_DOES_NOT_EXIST, False),  # 404
        (PERMISSION_DENIED, False),  # 403
        (UNAUTHENTICATED, False),  # 401
        (BAD_REQUEST, False),  # 400
        (INVALID_PARAMETER_VALUE, False),  # 400
    ],
)
def test_an_mlflow_error_is_transient_only_for_a_5xx_a_timeout_or_too_many_requests(code, transient):
    assert is_transient(_mlflow_error(code)) is transient


@pytest.mark.parametrize(
    "error",
    [
        ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused"),
        OSError(errno.ECONNRESET, "Connection reset by peer"),  # Python makes it a ConnectionResetError
        TimeoutError("timed out"),
        urllib3.exceptions.MaxRetryError(None, "/api/2.0/mlflow/runs/get", "too many retries"),
        urllib3.exceptions.ProtocolError("Connection aborted."),
        sqlalchemy.exc.OperationalError("SELECT 1", {}, Exception("database is locked")),
    ],
    ids=lambda error: type(error).__name__,
)
def test_a_lost_connection_a_timeout_and_a_busy_database_are_transient(error):
    assert is_transient(error) is True


@pytest.mark.parametrize("error", [ValueError("bad value"), KeyError("metric"), RuntimeError("bug")],
                         ids=lambda error: type(error).__name__)
def test_a_programming_error_is_not_transient(error):
    assert is_transient(error) is False


def test_pauses_double_from_the_first_up_to_the_longest():
    pauses = Backoff(first=0.5, longest=5.0).pauses()
    assert [next(pauses) for _ in range(7)] == [0.5, 1.0, 2.0, 4.0, 5.0, 5.0, 5.0]
    pauses = Backoff(first=0.25, longest=0.75).pauses()
    assert [next(pauses) for _ in range(4)] == [0.25, 0.5, 0.75, 0.75]


def test_jitter_shortens_each_pause_by_at_most_its_fraction_and_varies():
    random.seed(1)
    pauses = Backoff(first=1.0, longest=1.0, jitter=0.25).pauses()
    taken = [next(pauses) for _ in range(200)]
    assert all(0.75 <= pause <= 1.0 for pause in taken)
    assert min(taken) < 0.76 and max(taken) > 0.99  # the whole range is used
    assert len(set(taken)) > 150


def test_remaining_counts_down_to_the_deadline_and_never_below_zero():
    assert remaining(time.monotonic() - 5) == 0.0
    left = remaining(time.monotonic() + 100)
    assert 99 < left <= 100


class _Flaky:
    """A call that raises each of `errors` in turn, then returns 'done'."""

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.calls = 0

    def __call__(self) -> str:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return "done"


_SHORT = Backoff(first=0.001, longest=0.002)


def test_retry_returns_the_first_success_after_transient_errors(caplog):
    call = _Flaky(TimeoutError("timed out"), ConnectionResetError("x" * 300))
    with caplog.at_level(logging.INFO, logger="pipeline.tracking.retry"):
        assert retry(call, attempts=3, backoff=_SHORT) == "done"
    assert call.calls == 3
    assert [record.getMessage() for record in caplog.records] == [
        "Attempt 1 of 3 failed (timed out); retrying",
        f"Attempt 2 of 3 failed ({'x' * 160}); retrying",  # the error's first line, cut at 160 characters
    ]


def test_retry_makes_exactly_attempts_calls_and_raises_the_last_error():
    errors = [TimeoutError(f"attempt {number}") for number in range(1, 5)]
    call = _Flaky(*errors)
    with pytest.raises(TimeoutError, match="attempt 3"):
        retry(call, attempts=3, backoff=_SHORT)
    assert call.calls == 3
    call = _Flaky()
    assert retry(call, attempts=1, backoff=_SHORT) == "done" and call.calls == 1


def test_retry_raises_an_error_it_does_not_accept_at_once():
    call = _Flaky(ValueError("bad value"))
    with pytest.raises(ValueError, match="bad value"):
        retry(call, attempts=5, backoff=_SHORT)
    assert call.calls == 1
    call = _Flaky(TimeoutError("accepted by is_transient"))
    with pytest.raises(TimeoutError):
        retry(call, attempts=5, backoff=_SHORT, retry_if=lambda error: False)
    assert call.calls == 1


def test_retry_pauses_by_the_backoff_between_attempts():
    call = _Flaky(TimeoutError("1"), TimeoutError("2"))
    started = time.monotonic()
    retry(call, attempts=3, backoff=Backoff(first=0.1, longest=0.2))
    assert time.monotonic() - started >= 0.3  # 0.1 s, then 0.2 s
