"""BudgetPruner: a sweep's pruning sized to its budget of epochs, one early cut, then trials train to their end;
what the budget leaves at the end continues the trials stopped at the cut that proved to lead there."""

from __future__ import annotations

import math

import optuna
from optuna.study import StudyDirection
from optuna.trial import TrialState

# The share of a full search (every trial trained to its last epoch) that a pruned search trains at most.
BUDGET_SHARE = 0.5
# The user attribute of a trial that continues a paused one: the paused trial's number.
CONTINUES_ATTR = "continues_trial"


def continues(trial: optuna.trial.FrozenTrial) -> int | None:
    """The number of the paused trial that `trial` continues, or None for a trial of its own."""
    number = trial.user_attrs.get(CONTINUES_ATTR)
    return None if number is None else int(number)


def continued_trials(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """The numbers of the paused trials that a trial of `trials` continues (or is queued to)."""
    return {number for trial in trials if (number := continues(trial)) is not None}


class BudgetPruner(optuna.pruners.BasePruner):
    """Prunes a study of `trials` trials of at most `epochs` epochs so that it trains at most `share` of their
    `trials * epochs` epochs, and spends them on the trials that lead early.

    Every trial trains `cut` epochs (a quarter of `epochs`, at least one: earlier, a trial's validation score
    ranks its final one poorly). There it goes on only if its value ranks among the best `keep` part, rounded
    down, of the trials that reached that epoch so far, itself included: none of the first `1 / keep` trials
    goes on there (ASHA's promotion rule: the first trial alone proves nothing); `keep` is the part
    of the trials that the budget left after everyone's `cut` epochs can train to the end,
    `(share * epochs - cut) / (epochs - cut)`: a third for 12 epochs and half. A trial that goes on trains to its
    end, except that it stops as soon as going on would leave too few epochs to give every trial not yet
    started its `cut` epochs. Unlike successive halving, nothing is judged after the cut: a trial is not
    stopped by one noisy epoch once it has shown it leads. The epochs counted are those reported to the study
    (one per epoch); trials running in other processes count what they reported so far.

    A trial stopped at the cut is paused, not judged for good: it was compared with the trials that had reached the
    cut before it, and early in a study those are few. Once every
    trial has started, `to_continue` names the paused trial that ranks among the best `keep` part of all the trials
    at the cut, best first, while the budget left affords its remaining epochs: the sweep continues it from its
    saved state (ASHA's late promotion, continued as Keras Tuner's Hyperband continues a promoted trial), as a new
    trial whose `CONTINUES_ATTR` names it and which reports only the epochs after those it trained.

    Args:
        trials: the study's budget of trials.
        epochs: the most epochs a trial trains.
        share: the part of `trials * epochs` the study may train.
        cut: the epoch of the cut (default: a quarter of `epochs`).

    Example:
    ```python
    pruner = BudgetPruner(trials=18, epochs=12)
    study = optuna.create_study(direction="maximize", pruner=pruner)
    study.optimize(objective, n_trials=18)  # the objective reports each epoch's val_accuracy, asks should_prune
    while (paused := pruner.to_continue(study)) is not None:
        study.enqueue_trial(paused.params, user_attrs={CONTINUES_ATTR: paused.number})
        study.optimize(objective, n_trials=1)  # it resumes the paused run after its last reported epoch
    ```
    """

    def __init__(self, trials: int, epochs: int, share: float = BUDGET_SHARE, cut: int | None = None) -> None:
        if trials < 1 or epochs < 1 or not 0 < share <= 1:
            raise ValueError(f"trials and epochs must be >= 1 and 0 < share <= 1 (got {trials}, {epochs}, {share})")
        self.trials, self.epochs, self.share = trials, epochs, share
        self.cut = cut or max(1, epochs // 4)
        self.keep = max(0.0, (share * epochs - self.cut) / (epochs - self.cut)) if epochs > self.cut else 1.0

    @property
    def budget(self) -> float:
        """The most epochs the study trains."""
        return self.share * self.trials * self.epochs

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None or step < self.cut - 1:
            return False
        trials = study.get_trials(deepcopy=False)
        if step == self.cut - 1 and not self._leads(study.direction, trial.intermediate_values[step], step, trials):
            return True
        return self._spent(trials) + (self.epochs - step - 1) + self._not_started(trials) * self.cut > self.budget

    def to_continue(self, study: optuna.Study) -> optuna.trial.FrozenTrial | None:
        """The paused trial to continue now, or None: once every trial of the budget has started, the best one
        at the cut of the trials pruned there and not yet continued, if it ranks among the best `keep` part of
        all the trials that reached the cut and the budget affords its remaining epochs beside those that the
        running trials may still train."""
        trials = study.get_trials(deepcopy=False)
        if self._not_started(trials):
            return None
        step, sign = self.cut - 1, 1 if study.direction == StudyDirection.MAXIMIZE else -1
        continued = continued_trials(trials)
        paused = sorted((trial for trial in trials if trial.state == TrialState.PRUNED
                         and step in trial.intermediate_values and trial.number not in continued),
                        key=lambda trial: -sign * trial.intermediate_values[step])
        running = sum(self.epochs - len(trial.intermediate_values) for trial in trials
                      if trial.state == TrialState.RUNNING)
        affordable = self.budget - self._spent(trials) - running
        for trial in paused:
            if not self._leads(study.direction, trial.intermediate_values[step], step, trials):
                return None  # the rest rank lower still
            if self.epochs - len(trial.intermediate_values) <= affordable:
                return trial
        return None

    @staticmethod
    def _spent(trials: list) -> int:
        return sum(len(trial.intermediate_values) for trial in trials)

    def _not_started(self, trials: list) -> int:
        """Trials of the budget not started yet: points queued up front (a grid's) are not started, and a
        continuation is not a trial of the budget."""
        started = sum(trial.state != TrialState.WAITING and continues(trial) is None for trial in trials)
        return max(0, self.trials - started)

    def _leads(self, direction: StudyDirection, value: float, step: int, trials: list) -> bool:
        sign = 1 if direction == StudyDirection.MAXIMIZE else -1
        values = sorted((sign * other.intermediate_values[step] for other in trials
                         if step in other.intermediate_values), reverse=True)
        places = self._places(len(values))
        return places > 0 and sign * value >= values[places - 1]

    def _places(self, reached: int) -> int:
        """How many of the `reached` trials at the cut go on: the best `keep` part, rounded down, so none while
        fewer than `1 / keep` trials are there (ASHA's promotion rule)."""
        return math.floor(reached * self.keep)
