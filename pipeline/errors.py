"""Errors a user can act on.

Each carries a one-line message that names what was wrong (a parameter or a file), why, and what
is allowed. Entry points print the message and exit with status 2; nothing else is shown.
"""


class UserInputError(Exception):
    """Bad input from the user: a parameter or a data file. Exit status 2."""

    exit_code = 2


class ParameterError(UserInputError):
    """A parameter value is malformed or out of range.

    Args:
        name: the parameter's name as the user spells it (e.g. `learning_rate`).
        value: the value as given.
        allowed: what the parameter accepts, in words.
    """

    def __init__(self, name: str, value: object, allowed: str) -> None:
        self.name = name
        self.value = value
        self.allowed = allowed
        super().__init__(f"parameter {name}={value!r} is invalid: allowed is {allowed}")


class DataError(UserInputError):
    """A dataset cannot be loaded or fails validation.

    Args:
        source: the file, directory or dataset name at fault.
        problem: what is wrong with it, and what is expected.
    """

    def __init__(self, source: str, problem: str) -> None:
        self.source = source
        self.problem = problem
        super().__init__(f"dataset {source}: {problem}")


class RunSelectionError(UserInputError):
    """Nothing to act on: the experiment does not exist, or none of its training runs qualifies
    (finished, with a logged model, with the ranking metric). Exit status 2.

    Args:
        message: what was looked for, where, and what is missing.
    """


class ChampionRuleError(UserInputError):
    """A registration ranks by another rule (metric, mode) than the one stored with the registered
    model, and does not ask to change it. Exit status 2.

    Args:
        message: the model, its rule, the rule asked for, and how to use either.
    """


class TrainingDiverged(Exception):
    """The loss became NaN or infinite; training stopped and the run is FAILED. Exit status 1."""

    exit_code = 1


class RecordingError(Exception):
    """Something the run should hold could not be sent to the tracking store. Exit status 1."""

    exit_code = 1


class TrackingUnavailable(Exception):
    """The tracking server cannot be used: unreachable, or it refuses our credentials. Exit status 1."""

    exit_code = 1


class LocalStorageError(Exception):
    """The run's local files (checkpoints, logs) could not be written. Exit status 1."""

    exit_code = 1


class TrackingServerError(TrackingUnavailable):
    """The local tracking server could not be started: it exited, did not answer, refuses its saved
    admin credentials, or its database cannot be used. Exit status 1."""


class ClusterConfigError(UserInputError):
    """TF_CONFIG does not describe a usable multi-worker cluster. Exit status 2."""


class ClusterUnavailable(Exception):
    """Another worker of a multi-worker training cannot be reached, or was lost. Exit status 1."""

    exit_code = 1


def first_line(error: BaseException, limit: int = 200) -> str:
    """The first line of an error's message (its type's name when it has none), for a log line."""
    lines = str(error).strip().splitlines()
    return (lines[0] if lines else type(error).__name__)[:limit]
