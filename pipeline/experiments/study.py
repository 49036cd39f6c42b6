"""The Optuna study behind a sweep: where it is kept, how it samples and prunes, and how processes share it.

A study is named, and kept in a storage: by default a journal file next to the tracking store (several
processes on one machine share it safely), or a database (`postgresql+psycopg2://...`) that several
machines share. The process that creates the study creates the sweep's parent run and records its id in
the study; every other process with the same study name and storage joins that parent. Database
storages send heartbeats, so a trial whose process died is failed by the next process that starts a
trial; on one machine the sweep's own supervisor does it at once (`fail_trials_of`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import optuna
from mlflow.entities import RunStatus
from mlflow.tracking import MlflowClient
from optuna.storages import BaseStorage, JournalStorage, RDBStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from pipeline import constants as names
from pipeline.errors import ParameterError
from pipeline.experiments.pruning import BudgetPruner, continues
from pipeline.search_space import DEFAULT_TRIALS, Choices, SearchSpace
from pipeline.tracking.retry import Backoff, retry

logger = logging.getLogger(__name__)

JOURNAL_FILE = "optuna-studies.journal"
USER_CACHE = Path.home() / ".cache" / "mnist-pipeline"  # the default study file's place for a remote tracking server
PARENT_RUN_ATTR = "mlflow_parent_run_id"
SPACE_ATTR = "search_space"
RUN_ID_ATTR = "mlflow_run_id"
WORKER_ATTR = "worker"
ERROR_ATTR = "error"
JOIN_TIMEOUT_SECONDS = 60.0
# A database-backed trial proves it is alive every HEARTBEAT seconds; silent for GRACE, it is failed.
HEARTBEAT_SECONDS, GRACE_SECONDS = 20, 60
# How often a process whose trials are done looks at the trials other processes still run.
SETTLE_POLL_SECONDS = 2.0


def worker_id(pid: int | None = None) -> str:
    """How a trial names the process that runs it (its WORKER_ATTR): host and process id."""
    return f"{socket.gethostname()}:{pid or os.getpid()}"


@dataclasses.dataclass(frozen=True)
class SearchPlan:
    """How a sweep searches, from the parsed SWEEP_PARAMETERS.

    Args:
        space: the swept dimensions and the fixed training values.
        sampler: grid, random or tpe.
        pruner: none, budget, median or hyperband.
        trials: the study's trial budget, over every process.
        seed: the sampler's seed (the trials train with the training seed, the same for all).
        direction: `maximize` or `minimize`, from the ranking mode.
    """

    space: SearchSpace
    sampler: str
    pruner: str
    trials: int
    seed: int
    direction: str

    @classmethod
    def from_options(cls, options: Mapping[str, Any]) -> SearchPlan:
        """The plan of parsed SWEEP_PARAMETERS.

        Raises:
            ParameterError: a grid sampler over a range, or more grid trials than combinations.
        """
        space = SearchSpace.from_options(options)
        sampler = options["sampler"] or ("grid" if space.is_grid else "tpe")
        if sampler == "grid" and not space.is_grid:
            name = next(name for name in space.dimensions if name not in _listed(space))
            raise ParameterError(name, options[name], "a list of values with sampler=grid (a grid has no ranges)")
        grid_size = len(space.grid()) if sampler == "grid" else None
        trials = int(options["trials"]) if options["trials"] else grid_size or DEFAULT_TRIALS
        if grid_size is not None and trials > grid_size:
            raise ParameterError("trials", options["trials"], f"at most the grid's {grid_size} combinations")
        pruner = options["pruner"] or ("none" if sampler == "grid" else "budget")
        direction = "maximize" if options["mode"] == "max" else "minimize"
        return cls(space, sampler, pruner, trials, options["seed"], direction)

    def monitor(self, metric: str) -> str:
        """The per-epoch metric the pruner watches: `metric` itself if every epoch logs it, else validation
        accuracy (or loss, when lower is better). `best_val_accuracy` is logged only at an epoch with a new
        best: a stalled trial would never be judged again, so it prunes on `val_accuracy`."""
        if metric in names.EPOCH_METRICS:
            return metric
        return names.VAL_ACCURACY if self.direction == "maximize" else names.VAL_LOSS

    def make_sampler(self, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
        seed = self.seed + seed_offset
        if self.sampler == "grid":
            lists = {name: list(dimension.values) for name, dimension in self.space.dimensions.items()}
            return optuna.samplers.GridSampler(lists, seed=seed)
        if self.sampler == "random":
            return optuna.samplers.RandomSampler(seed=seed)
        # Optuna's default of 10 random start-up trials is most of a small budget; constant_liar keeps
        # parallel workers from proposing the same point.
        startup = max(3, min(10, self.trials // 3))
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup, constant_liar=True)

    @property
    def max_epochs(self) -> int:
        """The most epochs a trial trains: the fixed `epochs`, or the largest a swept `epochs` allows."""
        dimension = self.space.dimensions.get("epochs")
        if dimension is None:
            return int(self.space.fixed["epochs"])
        return int(max(dimension.values) if isinstance(dimension, Choices) else dimension.high)

    def make_pruner(self) -> optuna.pruners.BasePruner:
        if self.pruner == "budget":
            return BudgetPruner(self.trials, self.max_epochs)
        if self.pruner == "median":
            return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=2)
        if self.pruner == "hyperband":
            return optuna.pruners.HyperbandPruner(min_resource=1, reduction_factor=3)
        return optuna.pruners.NopPruner()

    def space_text(self, options: Mapping[str, Any]) -> dict[str, str]:
        """What the study searches and optimizes, as given: a joining process must do the same."""
        searched = {name: str(options[name]) for name in self.space.dimensions}
        return searched | {"sampler": self.sampler, "metric": options["metric"], "mode": options["mode"]}


def _listed(space: SearchSpace) -> set[str]:
    return {name for name, dimension in space.dimensions.items() if isinstance(dimension, Choices)}


def _local_store_directory(tracking_uri: str) -> Path | None:
    """The directory of a local tracking store (a SQLite file or a file store), else None."""
    from sqlalchemy.engine import make_url

    if tracking_uri.startswith("sqlite:"):
        database = make_url(tracking_uri).database
        return Path(database).absolute().parent if database and database != ":memory:" else None
    if "://" not in tracking_uri or tracking_uri.startswith("file:"):
        return Path(tracking_uri.removeprefix("file://").removeprefix("file:")).absolute().parent
    return None


def open_storage(storage: str, tracking_uri: str, client: MlflowClient) -> tuple[BaseStorage, str]:
    """The study storage `storage` names (default: a journal file next to a local tracking store, else in
    ~/.cache/mnist-pipeline), and its location as text, for the other processes.

    Raises:
        ParameterError: the database cannot be reached or the file cannot be written.
    """
    if not storage:
        storage = str((_local_store_directory(tracking_uri) or USER_CACHE) / JOURNAL_FILE)
    try:
        if "://" in storage:
            return _database_storage(storage, client), storage
        path = Path(storage).expanduser().absolute()
        path.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(path))), str(path)
    except Exception as error:  # noqa: BLE001 - SQLAlchemy and OS errors alike: the storage is unusable
        reason = " ".join(str(error).split("(Background on this error")[0].split())[:160]  # SQLAlchemy's link
        raise ParameterError("storage", shown_location(storage),
                             f"a reachable database URL or a writable file ({reason})") from None


# Processes started together on a new database all create Optuna's tables: the losers of that race meet the
# winner's objects and open the storage again. PostgreSQL's codes for it: unique_violation (an enum type's row in
# pg_type), duplicate_table, duplicate_object.
SCHEMA_RACE_CODES = frozenset({"23505", "42P07", "42710"})
SCHEMA_RACE_ATTEMPTS = 5
SCHEMA_RACE_BACKOFF = Backoff(first=0.2, longest=1.0, jitter=0.5)


def _lost_the_schema_race(error: Exception) -> bool:
    return getattr(getattr(error, "orig", None), "pgcode", None) in SCHEMA_RACE_CODES


def _database_storage(storage: str, client: MlflowClient) -> RDBStorage:
    def open_it() -> RDBStorage:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats
            return RDBStorage(storage, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=_FailRun(client))

    return retry(open_it, SCHEMA_RACE_ATTEMPTS, SCHEMA_RACE_BACKOFF, _lost_the_schema_race)


def shown_location(location: str) -> str:
    """A storage location as it may be printed or recorded: a database URL without its password."""
    from sqlalchemy.engine import make_url

    return make_url(location).render_as_string(hide_password=True) if "://" in location else location


@dataclasses.dataclass(frozen=True)
class SharedStudy:
    """A study opened by this process, and the sweep's parent run it belongs to.

    Args:
        study: the Optuna study.
        storage: where it is kept (the same object the study uses).
        location: the storage as text, for other processes.
        parent_run_id: the sweep's MLflow parent run.
        created: whether this process created the study (else it joined or continues it).
    """

    study: optuna.Study
    storage: BaseStorage
    location: str
    parent_run_id: str
    created: bool

    def done_count(self) -> int:
        """Trials of the budget taken so far (finished, pruned, failed or running; not those still waiting, nor
        the continuations of paused trials)."""
        return sum(continues(trial) is None for trial in self.study.get_trials(deepcopy=False, states=COUNTED_STATES))


COUNTED_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)


@dataclasses.dataclass(frozen=True)
class StudyRequest:
    """What a process needs to create or join a study.

    Args:
        plan: how the study searches.
        space_text: the search space as given (a joining process must search the same).
        name: the study's name ("" for a new study named after its parent run).
        seed_offset: added to the sampler's seed (parallel workers must not propose the same trials).
        metric: the objective's name in Optuna (`study.metric_names`: the dashboard's label of the value).
    """

    plan: SearchPlan
    space_text: dict[str, str]
    name: str
    seed_offset: int = 0
    metric: str = ""


def open_study(
    request: StudyRequest, storage: tuple[BaseStorage, str], new_parent: Callable[[], str]
) -> SharedStudy:
    """Creates the study (and its parent run, with `new_parent()`) or joins the existing one of that name.

    Raises:
        ParameterError: the existing study searches another space, or has no parent run.
    """
    plan, (backend, location) = request.plan, storage
    sampler, pruner = plan.make_sampler(request.seed_offset), plan.make_pruner()
    settings = dict(storage=backend, sampler=sampler, pruner=pruner, direction=plan.direction)
    name, parent_run_id = request.name, None
    if not name:
        parent_run_id = new_parent()
        name = f"sweep-{parent_run_id}"
    try:
        study = optuna.create_study(study_name=name, load_if_exists=False, **settings)
    except optuna.exceptions.DuplicatedStudyError:
        study = optuna.load_study(study_name=name, storage=backend, sampler=sampler, pruner=pruner)
        return SharedStudy(study, backend, location, _joined_parent(study, request), created=False)
    study.set_user_attr(SPACE_ATTR, request.space_text)
    if request.metric:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([request.metric])
    study.set_user_attr(PARENT_RUN_ATTR, parent_run_id or new_parent())
    return SharedStudy(study, backend, location, study.user_attrs[PARENT_RUN_ATTR], created=True)


def _joined_parent(study: optuna.Study, request: StudyRequest) -> str:
    """The parent run of a study another process created (waiting briefly while it records it)."""
    deadline = time.monotonic() + JOIN_TIMEOUT_SECONDS
    while PARENT_RUN_ATTR not in study.user_attrs and time.monotonic() < deadline:
        time.sleep(0.5)
    attrs = study.user_attrs
    if attrs.get(SPACE_ATTR, request.space_text) != request.space_text:
        searched = ", ".join(f"{key}={value}" for key, value in attrs[SPACE_ATTR].items())
        raise ParameterError("study", study.study_name, f"the name of a study with the same search space ({searched})")
    if PARENT_RUN_ATTR not in attrs:
        raise ParameterError("study", study.study_name, "a sweep study (this one has no MLflow parent run)")
    return attrs[PARENT_RUN_ATTR]


def enqueue_grid(shared: SharedStudy, plan: SearchPlan) -> None:
    """Queues the grid's first `plan.trials` points in order, each unless the study already has it (in any
    state: continuing a grid study queues the rest, and a failed point is not retried). Under the study's
    lock, so that processes started together on one study queue each point once."""
    with study_lock(shared):
        for point in plan.space.grid()[:plan.trials]:
            shared.study.enqueue_trial(point, skip_if_exists=True)


def settle_running_trials(shared: SharedStudy) -> None:
    """Waits, once this process has no trial left to take, while trials of other processes still run: a
    live one ends by itself, a dead one (its process killed, its machine or container lost) is failed, and
    its MLflow run with it, once its heartbeat is GRACE_SECONDS old. So the last process to end sees no
    trial running and ends the parent. Only a database storage has heartbeats: elsewhere it returns at once
    (on one machine the sweep's supervisor fails a dead worker's trial itself)."""
    if not isinstance(shared.storage, RDBStorage):
        return
    study, told = shared.study, False
    while running := study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if not told:
            logger.info("Waiting for %d running trial(s) of other processes: %s", len(running),
                        ", ".join(str(trial.number) for trial in running))
            told = True
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        time.sleep(SETTLE_POLL_SECONDS)


class StudyLock:
    """A held study lock; `release()` may come early, and again."""

    def __init__(self, release: Callable[[], None]) -> None:
        self._release: Callable[[], None] | None = release

    def release(self) -> None:
        release, self._release = self._release, None
        if release is not None:
            release()


@contextlib.contextmanager
def study_lock(shared: SharedStudy) -> Iterator[StudyLock]:
    """Holds the study's lock, shared by every process and machine on its storage: a PostgreSQL advisory
    lock (MySQL: GET_LOCK) for a database, a lock file of the study beside a journal or SQLite file. A process that
    dies releases it (its database session or file closes). Yields the lock, to release it early."""
    name = f"mnist-pipeline-study-{hashlib.sha256(shared.study.study_name.encode()).hexdigest()[:32]}"
    if "://" in shared.location and not shared.location.startswith("sqlite"):
        from sqlalchemy import create_engine, text
        from sqlalchemy.pool import NullPool

        engine = create_engine(shared.location, poolclass=NullPool)
        connection = engine.connect()
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": int(name[-15:], 16)})
        else:
            connection.execute(text("SELECT GET_LOCK(:name, -1)"), {"name": name})
        lock = StudyLock(connection.close)  # ends the session, and with it the lock
    else:
        from sqlalchemy.engine import make_url

        path = make_url(shared.location).database if "://" in shared.location else shared.location
        # not `{path}.lock`: Optuna's journal file takes that name for a lock of its own
        handle = open(f"{path}.{name}.lock", "a")  # noqa: SIM115 - closed by the lock's release
        fcntl.flock(handle, fcntl.LOCK_EX)
        lock = StudyLock(handle.close)  # closing the file releases the lock
    try:
        yield lock
    finally:
        lock.release()


@dataclasses.dataclass(frozen=True)
class _FailRun:
    """Ends the MLflow run of a trial that Optuna failed for a lost heartbeat."""

    client: MlflowClient

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        fail_trial_run(self.client, trial, "its process stopped sending heartbeats")


def fail_trial_run(client: MlflowClient, trial: FrozenTrial, why: str) -> None:
    """Marks a dead trial's MLflow run FAILED, if it had one and it is still RUNNING."""
    run_id = trial.user_attrs.get(RUN_ID_ATTR)
    logger.warning("Trial %d failed: %s", trial.number, why)
    if run_id and client.get_run(run_id).info.status == RunStatus.to_string(RunStatus.RUNNING):
        client.set_tag(run_id, names.TAG_TRIAL_STATE, TRIAL_STATES[TrialState.FAIL])
        client.set_terminated(run_id, "FAILED")


def fail_trials_of(shared: SharedStudy, client: MlflowClient, worker: str, why: str) -> list[int]:
    """Fails the RUNNING trials of a worker process that died, and their runs; returns their numbers."""
    storage = shared.storage
    study_id = storage.get_study_id_from_name(shared.study.study_name)
    failed = []
    for trial in shared.study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if trial.user_attrs.get(WORKER_ATTR) != worker:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
        storage.set_trial_user_attr(trial_id, ERROR_ATTR, why)
        if storage.set_trial_state_values(trial_id, TrialState.FAIL):
            fail_trial_run(client, trial, why)
            failed.append(trial.number)
    return failed


# How a trial's state is shown: the trials table, the child run's tag and its name.
TRIAL_STATES = {
    TrialState.COMPLETE: "finished",
    TrialState.PRUNED: "pruned",
    TrialState.FAIL: "failed",
    TrialState.RUNNING: "running",
    TrialState.WAITING: "waiting",
}
