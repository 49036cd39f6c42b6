"""A child process and its whole process group: started and stopped without a Ctrl-C cutting a step
short, waited for until every member is gone (what the native tracking server needs)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def signals_held() -> Iterator[None]:
    """Holds SIGINT and SIGTERM while the block runs; one that arrived is delivered (to the handler
    that was in place) when it ends. In the main thread only: Python runs signal handlers there, so
    elsewhere nothing can interrupt the block anyway. Ignored signals stay ignored."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: list[int] = []
    previous = {}
    try:
        for number in _HELD_SIGNALS:
            handler = signal.getsignal(number)
            if handler is None or handler == signal.SIG_IGN:  # not set from Python, or ignored: leave it
                continue
            previous[number] = handler
            signal.signal(number, lambda received, _frame: arrived.append(received))
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        if arrived:
            signal.raise_signal(arrived[0])


def poll(process: subprocess.Popen) -> int | None:
    """process.poll(), not interruptible: a KeyboardInterrupt raised inside Popen.poll() can leave its
    internal wait lock held, and every later wait() then times out (60 s for stop())."""
    with signals_held():
        return process.poll()


def free_port(host: str) -> int:
    """A TCP port free on `host` now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        return probe.getsockname()[1]


def signal_group(group: int, signal_number: int) -> None:
    """Sends a signal to every process of `group`, if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, signal_number)


def group_alive(group: int) -> bool:
    """Whether a process of `group` still exists."""
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


def wait_for_group(process: subprocess.Popen, group: int, timeout: float) -> bool:
    """Waits for the leader (reaping it) and then for every other member of its group to be gone."""
    deadline = time.monotonic() + timeout
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    while group_alive(group):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True
