"""A stop asked for by a signal (Ctrl-C, SIGTERM), kept so that it is honoured even when the
KeyboardInterrupt that announced it was lost.

An entry point turns the first SIGINT or SIGTERM into a KeyboardInterrupt and ignores later ones, so
that a second Ctrl-C cannot cut the clean-up short (`mlflow_project.common.stop_on_first_signal`).
Python runs a signal handler between two bytecodes of the main thread, wherever that is, also inside a
finalizer (`__del__`, a weakref callback; TensorFlow's tensors and resources have many), and an exception
raised there is dropped (Python prints it as "Exception ignored in ..."; the entry points' hook keeps that
off the console). The process then went on as if no signal had come, deaf to the next one: a worker of a
SIGKILLed sweep finished its trial and trained two more. So the handler also calls `request_stop()`, and
the library calls `raise_if_stop_requested()` where it can stop cleanly: after every batch and epoch
(`pipeline.callbacks.StopRequestCheck`) and before each trial.
"""

from __future__ import annotations

import threading

_requested = threading.Event()


def request_stop() -> None:
    """Records that this process was asked to stop (by a signal handler)."""
    _requested.set()


def stop_requested() -> bool:
    """Whether this process was asked to stop."""
    return _requested.is_set()


def raise_if_stop_requested() -> None:
    """Raises KeyboardInterrupt, as the signal did, when this process was asked to stop."""
    if _requested.is_set():
        raise KeyboardInterrupt


def clear_stop_request() -> None:
    """Forgets a stop request (for a process that goes on after handling one, as tests do)."""
    _requested.clear()
