"""One sweep trial: a full training run, nested under the sweep's parent, whose outcome Optuna learns from.

The trial's child run is created first (named `trial-N`, N being Optuna's trial number from 0, tagged with
that number, the study's name, the parent and the parent's source), so that its id is in the study before
training starts and a trial whose process dies can be found and failed. A pruned trial stops at an epoch's
end and keeps its whole record (`stop_reason=pruned`, run KILLED: it did not finish); a failing trial is
FAILED and the sweep goes on; what would fail every trial alike (bad data, an unreachable tracking server)
stops the process.

Once the study's budget of trials has started, the budget pruner's epochs left over go to the trials it paused at
its cut that proved to lead there (`BudgetPruner.to_continue`): each is continued in its own run, from the state
saved at its last epoch, by a new Optuna trial that names it (`CONTINUES_ATTR`); the run's earlier epochs stay, and
it ends as the continuation does (finished, or pruned again by the budget).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math

import keras
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline import constants as names
from pipeline.callbacks import TrialPruning
from pipeline.errors import TrackingUnavailable, UserInputError, first_line
from pipeline.experiments.pruning import CONTINUES_ATTR, BudgetPruner, continues
from pipeline.experiments.runs import Ranking
from pipeline.experiments.study import (
    ERROR_ATTR,
    RUN_ID_ATTR,
    TRIAL_STATES,
    WORKER_ATTR,
    SearchPlan,
    SharedStudy,
    StudyLock,
    study_lock,
    worker_id,
)
from pipeline.stop_request import raise_if_stop_requested
from pipeline.tracking.resume import RunNotResumable
from pipeline.training.run import run_training

logger = logging.getLogger(__name__)


INTERRUPTED = "interrupted (Ctrl-C or SIGTERM)"


class TrialFailed(Exception):
    """A trial that failed on its own (the sweep goes on)."""


@dataclasses.dataclass(frozen=True)
class TrialRunner:
    """Optuna's objective for a sweep: runs trials in this process and stops at the study's budget.

    Args:
        client: the tracking client.
        shared: the study and its parent run.
        plan: the search plan (space, budget, pruner).
        ranking: the metric the study optimizes (the run's final value of it).
        experiment_id: where the trials' runs go (the parent's experiment).
    """

    client: MlflowClient
    shared: SharedStudy
    plan: SearchPlan
    ranking: Ranking
    experiment_id: str

    def run(self) -> None:
        """Takes trials until the study has its budget of trials (counting those of every process), then
        continues the paused trials that the budget pruner names."""
        if self.plan.sampler == "grid":
            self._run_grid()
        elif self.shared.done_count() < self.plan.trials:
            raise_if_stop_requested()
            self.shared.study.optimize(self, catch=(TrialFailed,), callbacks=[self._after_trial])
        self._continue_paused()

    def _after_trial(self, study: optuna.Study, _trial: optuna.trial.FrozenTrial) -> None:
        if self.shared.done_count() >= self.plan.trials:
            study.stop()
        raise_if_stop_requested()  # a stop whose KeyboardInterrupt was dropped (pipeline.stop_request)

    def _run_grid(self) -> None:
        """Takes the study's queued grid points one at a time until none is left. Finding one and taking it
        happen under the study's lock: a process that found the queue empty when taking would have Optuna
        sample a point again."""
        study = self.shared.study
        while True:
            raise_if_stop_requested()
            with study_lock(self.shared) as lock:
                if (self.shared.done_count() >= self.plan.trials
                        or not study.get_trials(deepcopy=False, states=(TrialState.WAITING,))):
                    return
                study.optimize(functools.partial(self._taken, lock), n_trials=1, catch=(TrialFailed,))

    def _continue_paused(self) -> None:
        """Continues, one at a time, the paused trials the budget pruner names; naming one and queueing its
        continuation happen under the study's lock, so that two processes never continue the same trial."""
        study = self.shared.study
        if not isinstance(study.pruner, BudgetPruner):
            return
        while True:
            raise_if_stop_requested()
            with study_lock(self.shared) as lock:
                paused = study.pruner.to_continue(study)
                if paused is None:
                    return
                study.enqueue_trial(paused.params, user_attrs={CONTINUES_ATTR: paused.number})
                study.optimize(functools.partial(self._taken, lock), n_trials=1, catch=(TrialFailed,))

    def _taken(self, lock: StudyLock, trial: optuna.Trial) -> float:
        """The objective of a grid point this process has taken: others may take the next one now."""
        lock.release()
        return self(trial)

    def __call__(self, trial: optuna.Trial) -> float:
        number = trial.number  # Optuna's own number, from 0: the dashboard's, its plots' and the run name's
        config = self.plan.space.suggest(trial)
        settings = ", ".join(f"{name}={value}" for name, value in trial.params.items())
        trial.set_user_attr(WORKER_ATTR, worker_id())
        paused = continues(trial)
        if paused is None:
            logger.info("Trial %d (%d/%d): %s", number, number + 1, self.plan.trials, settings)
            run_id = self.client.create_run(self.experiment_id, run_name=f"trial-{number}", tags={
                **self._source_tags(),
                "mlflow.parentRunId": self.shared.parent_run_id,
                names.TAG_STUDY_NAME: self.shared.study.study_name,
                names.TAG_SWEEP_TRIAL: str(number),
                names.TAG_TRIAL_STATE: TRIAL_STATES[TrialState.RUNNING],
            }).info.run_id
        else:
            run_id = self._reopen(number, paused, settings)
        shown = number if paused is None else paused  # the number in the run's name
        trial.set_user_attr(RUN_ID_ATTR, run_id)
        pruning = None if self.plan.pruner == "none" else TrialPruning(trial, self.plan.monitor(self.ranking.metric))
        keras.backend.clear_session()  # each trial starts from a fresh Keras state, as a run of its own does
        try:
            result = run_training(config, run_id=run_id, pruning=pruning, continue_pruned=paused is not None)
        except (UserInputError, TrackingUnavailable) as error:
            if paused is not None and isinstance(error, RunNotResumable):
                # e.g. its saved states cannot be read: this continuation fails, the sweep goes on, the run stays
                # as its pruner left it
                self.client.delete_tag(run_id, names.TAG_CONTINUED_BY_TRIAL)
                self._end(run_id, shown, TrialState.PRUNED)
                reason = f"trial {paused} cannot be continued: {first_line(error, 300)}"
                logger.warning("Trial %d failed: %s", number, reason)
                trial.set_user_attr(ERROR_ATTR, reason)
                raise TrialFailed(reason) from None
            self._end(run_id, shown, TrialState.FAIL)
            raise
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Optuna fails the trial, the sweep stops
            trial.set_user_attr(ERROR_ATTR, INTERRUPTED)
            self._end(run_id, shown, TrialState.FAIL)
            raise
        except Exception as failure:  # noqa: BLE001 - a failing trial is recorded, and the sweep goes on
            self._fail(trial, run_id, " ".join(str(failure).split()) or type(failure).__name__, shown)
        value = self.client.get_run(run_id).data.metrics.get(self.ranking.metric)
        if result.stop_reason == names.STOP_PRUNED:
            logger.info("Trial %d pruned after epoch %d", number, result.epochs_completed)
            self._end(run_id, shown, TrialState.PRUNED)
            raise optuna.TrialPruned()
        if value is None or not math.isfinite(value):
            self._fail(trial, run_id, f"the run recorded no finite {self.ranking.metric}", shown)
        self._end(run_id, shown, TrialState.COMPLETE)
        logger.info("Trial %d finished: %s=%.4f", number, self.ranking.metric, value)
        return value

    def _reopen(self, number: int, paused: int, settings: str) -> str:
        """The run of paused trial `paused`, which trial `number` continues: shown running again, and naming
        its continuation."""
        [frozen] = [trial for trial in self.shared.study.get_trials(deepcopy=False) if trial.number == paused]
        run_id = frozen.user_attrs[RUN_ID_ATTR]
        logger.info("Trial %d continues trial %d from epoch %d: %s", number, paused,
                    len(frozen.intermediate_values) + 1, settings)
        self.client.set_tag(run_id, names.TAG_CONTINUED_BY_TRIAL, str(number))
        self._end(run_id, paused, TrialState.RUNNING)
        return run_id

    def _source_tags(self) -> dict[str, str]:
        """The parent's source tags (what `mlflow run` or the sweep command set), so that the UI shows the
        trial's Source, user and commit as the sweep's."""
        tags = self.client.get_run(self.shared.parent_run_id).data.tags
        return {key: tags[key] for key in names.SOURCE_TAGS if key in tags}

    def _fail(self, trial: optuna.Trial, run_id: str, error: str, shown: int) -> None:
        logger.warning("Trial %d failed: %s", trial.number, error)
        trial.set_user_attr(ERROR_ATTR, error)
        if self.client.get_run(run_id).info.status == "RUNNING":  # failed before its run was opened
            self.client.set_terminated(run_id, "FAILED")
        self._end(run_id, shown, TrialState.FAIL)
        raise TrialFailed(error)

    def _end(self, run_id: str, number: int, state: TrialState) -> None:
        """The child's final trial state, as a tag and in its name (the UI's runs table shows both)."""
        shown = TRIAL_STATES[state]
        self.client.set_tag(run_id, names.TAG_TRIAL_STATE, shown)
        name = f"trial-{number}" if state in (TrialState.COMPLETE, TrialState.RUNNING) else f"trial-{number}-{shown}"
        self.client.update_run(run_id, name=name)
