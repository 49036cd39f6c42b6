"""`python -m mlflow_project ...` and the `mnist-pipeline` console script."""

import logging
import os
import sys

from mlflow_project.cli import cli


def main() -> None:
    """Runs the CLI, then leaves the process at once.

    When a command returns, its run is ended, its records delivered and its files closed; what is
    left is the interpreter's teardown of TensorFlow and MLflow, which `os._exit` skips (what that
    saves: bench/RESULTS.md, "What each speed trick buys").
    """
    code: int | str | None = 0
    try:
        cli.main()  # click ends with SystemExit, whatever the outcome
    except SystemExit as exit_request:
        code = exit_request.code
    if not isinstance(code, int):
        if code is not None:
            print(code, file=sys.stderr)
        code = 0 if code is None else 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
