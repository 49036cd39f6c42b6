"""A child process and its whole process group: started and stopped without a Ctrl-C cutting a step
short, waited for until every member is gone (what the native tracking server needs)."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)
# prctl(2): the signal this process gets when the thread that started it exits (kept across execve).
_PR_SET_PDEATHSIG = 1


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


def die_with_parent(parent_pid: int, signal_number: int = signal.SIGTERM) -> bool:
    """Asks Linux to send this process `signal_number` when its parent dies, however it dies (SIGKILL
    included): prctl(PR_SET_PDEATHSIG). Then checks that the parent is still `parent_pid`: a parent that
    died before the request was made is never signalled, so the caller must stop when this returns False.
    Elsewhere than Linux nothing is asked and it returns True.

    Raises:
        OSError: the kernel refused the request.
    """
    if not sys.platform.startswith("linux"):
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_PDEATHSIG, int(signal_number), 0, 0, 0) != 0:
        number = ctypes.get_errno()
        raise OSError(number, f"prctl(PR_SET_PDEATHSIG): {os.strerror(number)}")
    return os.getppid() == parent_pid


def wait_at_barrier(variable: str, seconds: float = 300.0, waiting: str | None = None, go: str = "go") -> None:
    """For tests that force a race: when the environment variable `variable` names a directory, leaves a
    file `waiting` (default `waiting-<pid>`) in it and waits (at most `seconds`) for a file `go` there;
    else returns at once."""
    directory = os.environ.get(variable)
    if not directory:
        return
    (Path(directory) / (waiting or f"waiting-{os.getpid()}")).touch()
    deadline = time.monotonic() + seconds
    while not (Path(directory) / go).exists() and time.monotonic() < deadline:
        time.sleep(0.01)
