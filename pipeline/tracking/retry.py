"""One rule for retrying what a busy or unreachable tracking store refused: which errors are worth
another attempt (network and server errors), which are this machine's own (a full or read-only local
disk: never retried), and how long to wait between attempts."""

from __future__ import annotations

import dataclasses
import errno
import logging
import random
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from mlflow.exceptions import MlflowException

from pipeline.errors import LocalStorageError, first_line

logger = logging.getLogger(__name__)

T = TypeVar("T")


# OS errors that mean "this machine's files cannot be written": a local error, never an outage.
LOCAL_STORAGE_ERRORS = frozenset(
    {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.EIO}
)
# OS errors of a connection to the store: an outage, worth another attempt.
NETWORK_ERRORS = frozenset({
    errno.ECONNREFUSED, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT,
    errno.EHOSTUNREACH, errno.EHOSTDOWN, errno.ENETUNREACH, errno.ENETDOWN, errno.ENETRESET,
})


def is_local_storage_error(error: BaseException) -> bool:
    """True for a local disk that is full, read-only or unwritable (see LOCAL_STORAGE_ERRORS)."""
    return isinstance(error, OSError) and error.errno in LOCAL_STORAGE_ERRORS


def local_storage_error(directory: Path | str, error: OSError) -> LocalStorageError:
    """The one line for a local disk error: the directory, the error and its errno, the file, and what to do."""
    number = error.errno
    code = f" [Errno {number} {errno.errorcode.get(number, '?')}]" if number is not None else ""
    file = f" writing {error.filename}" if error.filename else ""
    return LocalStorageError(
        f"cannot write the run's local files in {directory} ({error.strerror or first_line(error)}){code}{file}; "
        "free disk space or point TMPDIR at a writable disk"
    )


def is_transient(error: BaseException) -> bool:
    """True when retrying may succeed: the store is unreachable, overloaded or busy (network and
    server errors). A local OS error (a full disk, a read-only directory) is not."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (408, 429)
    if isinstance(error, (ConnectionError, TimeoutError, socket.herror, socket.gaierror)):
        return True
    if type(error).__module__.startswith(("requests", "urllib3", "sqlalchemy")):
        return True
    return isinstance(error, OSError) and error.errno in NETWORK_ERRORS


@dataclasses.dataclass(frozen=True)
class Backoff:
    """Pauses between attempts: `first` seconds, doubling up to `longest`, each shortened by a random
    part of up to `jitter` of it, so that processes retrying the same race do not collide again.

    Args:
        first: the first pause.
        longest: no pause is longer.
        jitter: the largest fraction taken off a pause at random (0 keeps them exact).
    """

    first: float = 0.5
    longest: float = 5.0
    jitter: float = 0.0

    def pauses(self) -> Iterator[float]:
        pause = self.first
        while True:
            yield pause * (1 - random.uniform(0, self.jitter))
            pause = min(pause * 2, self.longest)


def remaining(deadline: float) -> float:
    """Seconds left until `deadline` (time.monotonic()), never negative."""
    return max(0.0, deadline - time.monotonic())


STORE_BACKOFF = Backoff()  # an unreachable or busy store: 0.5 s, 1 s, 2 s, ... up to 5 s


def retry(
    call: Callable[[], T],
    attempts: int,
    backoff: Backoff = STORE_BACKOFF,
    retry_if: Callable[[Exception], bool] = is_transient,
) -> T:
    """Calls `call` up to `attempts` times, pausing by `backoff` after each error `retry_if` accepts;
    raises the last error, or at once an error it does not accept."""
    pauses = backoff.pauses()
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == attempts or not retry_if(error):
                raise
            logger.info("Attempt %d of %d failed (%s); retrying", attempt, attempts, first_line(error, 160))
            time.sleep(next(pauses))
    raise AssertionError("unreachable")
