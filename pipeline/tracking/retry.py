"""One rule for retrying what a busy or unreachable tracking store refused: which errors are worth
another attempt, and how long to wait between attempts."""

from __future__ import annotations

import dataclasses
import logging
import random
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from mlflow.exceptions import MlflowException

from pipeline.errors import first_line

logger = logging.getLogger(__name__)

T = TypeVar("T")


def is_transient(error: BaseException) -> bool:
    """True when retrying may succeed: the store is unreachable, overloaded or busy."""
    if isinstance(error, MlflowException):
        status = error.get_http_status_code()
        return status >= 500 or status in (408, 429)
    return isinstance(error, (OSError, ConnectionError, TimeoutError)) or (
        type(error).__module__.startswith(("requests", "urllib3", "sqlalchemy"))
    )


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
