"""PlotProcess: draws a run's plots in a separate Python process while the training process goes on.

After `fit`, the plots and `log_model` are the bulk of the time, and both are Python-bound: on a
thread the plots would only share the GIL with `log_model`. A child process draws them on another core
instead (bench/RESULTS.md, "What each speed trick buys"). It is a plain
`python -c` child fed through stdin, not `multiprocessing`: spawning with `multiprocessing`
re-imports the caller's `__main__`, which re-runs any script that calls the library without an
`if __name__ == "__main__"` guard.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import Any

import pipeline
from pipeline.tracking import reporting

# The functions of `pipeline.tracking.reporting` the child may be asked to call.
PLOT_FUNCTIONS = ("plot_training_curves", "plot_confusion_matrix")
_CHILD = "from pipeline.tracking.plot_process import serve; serve()"
# Exit code of a child whose plot raised an OSError; its first stderr line is "errno<TAB>message".
_OS_ERROR_EXIT = 3


class PlotProcess:
    """A child process that calls plotting functions of `pipeline.tracking.reporting`, in order.

    Use it as a context manager: `submit` returns at once; leaving the block waits until every plot
    is drawn and raises the first failure (an OSError keeps its errno, so a full disk is reported
    as such).

    Args:
        timeout: seconds to wait, at the end, for the plots to be drawn.
    """

    def __init__(self, timeout: float = 120.0) -> None:
        self.timeout = timeout
        package_root = str(Path(pipeline.__file__).resolve().parents[1])
        python_path = os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))
        self._process = subprocess.Popen(
            [sys.executable, "-c", _CHILD],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": python_path},
        )

    def submit(self, function: str, *args: Any) -> None:
        """Asks the child to call `pipeline.tracking.reporting.<function>(*args)`."""
        if function not in PLOT_FUNCTIONS:
            raise ValueError(f"not a plot function: {function}")
        with contextlib.suppress(BrokenPipeError):  # the child failed: `close` says why
            pickle.dump((function, args), self._process.stdin)
            self._process.stdin.flush()

    def close(self) -> None:
        """Waits for every submitted plot; raises OSError or RuntimeError when one failed."""
        try:  # closes stdin, which ends the child's loop
            _, stderr = self._process.communicate(timeout=self.timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.communicate()
            raise RuntimeError(f"drawing the plots took more than {self.timeout:.0f} s") from None
        if self._process.returncode == _OS_ERROR_EXIT:
            number, _, message = stderr.decode(errors="replace").partition("\t")
            raise OSError(int(number), message.strip())
        if self._process.returncode != 0:
            last_line = (stderr.decode(errors="replace").strip().splitlines() or ["no output"])[-1]
            raise RuntimeError(f"drawing the plots failed: {last_line}")

    def __enter__(self) -> PlotProcess:
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is None:
            self.close()
        else:  # the caller failed: do not wait for plots nobody will record
            self._process.kill()
            self._process.communicate()


def serve() -> None:
    """The child's side: calls each requested plot function until stdin closes."""
    stdin = sys.stdin.buffer
    while True:
        try:
            function, args = pickle.load(stdin)
        except EOFError:
            return
        try:
            getattr(reporting, function)(*args)
        except OSError as error:
            sys.stderr.write(f"{error.errno or 0}\t{error.strerror or error}\n")
            sys.exit(_OS_ERROR_EXIT)
