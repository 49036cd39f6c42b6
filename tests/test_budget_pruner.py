"""BudgetPruner driven the way a sweep drives it: a real Optuna study, each trial reporting its epochs' values in
turn and asking `should_prune` after each, never stopped at its last epoch (as `TrialPruning` does)."""

from __future__ import annotations

import random

import optuna
import pytest

from pipeline.experiments.pruning import CONTINUES_ATTR, BudgetPruner, continues

pytestmark = pytest.mark.timeout(60)


def _study(trials: int = 18, epochs: int = 12, direction: str = "maximize") -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction=direction, pruner=BudgetPruner(trials, epochs))


def _play(study: optuna.Study, values: list[float]) -> int:
    """One trial reporting `values` (one per epoch, all its epochs); the epochs it trained."""
    trial = study.ask()
    for epoch, value in enumerate(values):
        trial.report(value, epoch)
        if epoch + 1 < len(values) and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch + 1
    study.tell(trial, values[-1])
    return len(values)


def _curve(start: float, rise: float = 0.01, epochs: int = 12) -> list[float]:
    return [start + rise * epoch for epoch in range(epochs)]


def test_the_rule_is_sized_by_the_budget():
    pruner = BudgetPruner(trials=18, epochs=12)
    assert (pruner.cut, pruner.budget) == (3, 108)
    assert pruner.keep == pytest.approx(1 / 3)  # (0.5 * 12 - 3) / (12 - 3): what half the epochs can finish
    assert (BudgetPruner(20, 20).cut, BudgetPruner(20, 2).cut) == (5, 1)


def test_no_trial_goes_on_before_three_have_reached_the_cut_then_only_the_best_third():
    """ASHA's promotion: the best floor(n / 3) of the n trials at the cut so far go on, none while n < 3."""
    study = _study()
    assert _play(study, _curve(0.80)) == 3  # alone at the cut: paused however well it does
    assert _play(study, _curve(0.85)) == 3
    assert _play(study, _curve(0.81)) == 3  # three there: one place, and trial 1 holds it
    assert _play(study, _curve(0.86)) == 12  # four: still one place, and it leads: trains to its end
    assert _play(study, _curve(0.84)) == 3
    assert _play(study, _curve(0.845)) == 3  # six: two places (0.86 and 0.85); third is not enough
    assert _play(study, _curve(0.855)) == 12  # seven: two places, second


def _two_below(study: optuna.Study, value: float, rise: float = 0.01) -> None:
    """Two trials at the cut, `value` and `value - rise`: the third one there takes the only place if it leads."""
    for start in (value, value - rise):
        assert _play(study, _curve(start, rise)) == 3


def test_after_the_cut_only_the_budget_stops_a_trial():
    """A trial that led at the cut is not judged again: a later fall behind every other trial does not stop it."""
    study = _study()
    _two_below(study, 0.80)
    falling = _curve(0.85)[:3] + [0.10] * 9
    assert _play(study, falling) == 12


def test_lower_is_better_when_the_study_minimizes():
    study = _study(direction="minimize")
    _two_below(study, 0.50, rise=-0.01)
    assert _play(study, _curve(0.60, rise=-0.01)) == 3  # a higher loss at the cut
    assert _play(study, _curve(0.40, rise=-0.01)) == 12


def test_a_study_never_trains_more_than_its_budget_and_every_trial_reaches_the_cut():
    """From the third trial on each trial leads everything before it, so the cut stops none: the budget alone must
    hold the study to half of 18 x 12 epochs, keeping for every trial not yet started its 3 epochs up to the cut,
    and then the paused trials continued."""
    study = _study()
    trained = [_play(study, _curve(0.50 + 0.02 * number)) for number in range(18)]
    assert sum(trained) <= 108
    assert min(trained) >= 3
    assert trained[:2] == [3, 3] and sum(epochs == 12 for epochs in trained) >= 5  # the budget went to whole trials
    while (paused := study.pruner.to_continue(study)) is not None:
        _continue(study, paused, _curve(0.50 + 0.02 * paused.number))
    assert sum(len(trial.intermediate_values) for trial in study.trials) <= 108


def test_in_any_order_the_budget_holds():
    generator = random.Random(7)
    for _ in range(20):
        study = _study()
        trained = [_play(study, _curve(generator.uniform(0.7, 0.9), generator.uniform(0.0, 0.02)))
                   for _ in range(18)]
        assert sum(trained) <= 108 and min(trained) >= 3, trained


@pytest.mark.parametrize(("trials", "epochs", "share"), [(0, 12, 0.5), (18, 0, 0.5), (18, 12, 0.0), (18, 12, 1.5)])
def test_a_budget_that_cannot_be_is_refused(trials, epochs, share):
    with pytest.raises(ValueError, match="trials and epochs must be >= 1 and 0 < share <= 1"):
        BudgetPruner(trials, epochs, share)


def test_a_search_prunes_with_it_unless_told_otherwise():
    from pipeline.config import parse_parameters
    from pipeline.experiments.study import SearchPlan
    from pipeline.search_space import SWEEP_PARAMETERS

    def plan(values: dict[str, str]) -> SearchPlan:
        return SearchPlan.from_options(parse_parameters(SWEEP_PARAMETERS, values))

    searched = plan({"learning_rate": "1e-4:1e-2:log", "epochs": "12", "trials": "18"})
    assert (searched.sampler, searched.pruner) == ("tpe", "budget")
    pruner = searched.make_pruner()
    assert isinstance(pruner, BudgetPruner) and (pruner.trials, pruner.epochs) == (18, 12)
    assert plan({"learning_rate": "1e-4:1e-2:log", "epochs": "4:30"}).make_pruner().epochs == 30  # the most
    assert plan({"learning_rate": "1e-4:1e-2:log", "epochs": "5,10"}).make_pruner().epochs == 10
    assert plan({"learning_rate": "0.001,0.01"}).pruner == "none"  # a grid trains every point fully


def test_points_queued_up_front_are_not_trials_started():
    """A grid queues every point in the study before the first trial: they still need their epochs to the cut. Of 5
    points of 4 epochs (10 in all), the fourth leads at the cut, but its 3 more epochs would leave the fifth none."""
    study = _study(trials=5, epochs=4)
    for rate in (0.00001, 0.00002, 0.01, 0.005, 0.003):
        study.enqueue_trial({"learning_rate": rate})
    assert [_play(study, _curve(start, epochs=4)) for start in (0.10, 0.20, 0.70, 0.80)] == [1, 1, 4, 1]


def _continue(study: optuna.Study, paused: optuna.trial.FrozenTrial, values: list[float]) -> int:
    """Continues `paused` as a sweep does (a new trial naming it, reporting the epochs after its last); the
    epochs it trained."""
    study.enqueue_trial(paused.params, user_attrs={CONTINUES_ATTR: paused.number})
    trial = study.ask()
    assert trial.user_attrs[CONTINUES_ATTR] == paused.number
    start = len(paused.intermediate_values)
    for epoch in range(start, len(values)):
        trial.report(values[epoch], epoch)
        if epoch + 1 < len(values) and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch + 1 - start
    study.tell(trial, values[-1])
    return len(values) - start


def _second_best_at_the_cut_judged_early() -> dict[int, list[float]]:
    """Trial 0, second of all 18 at the cut and the best at the end, was alone there when it got there: paused;
    trial 1 pauses too, trial 2 leads the three at the cut and goes on, trials 3-17 rank lower (0.818, 0.817,
    ...) and pause."""
    second = _curve(0.872)[:3] + _curve(0.90, rise=0.02, epochs=9)
    return {0: second, 1: _curve(0.80), 2: _curve(0.873)} | {n: _curve(0.801 - 0.001 * n) for n in range(3, 18)}


def test_the_budget_left_continues_the_paused_trials_that_lead_at_the_cut_best_first():
    """45 of the 108 epochs are left: the six best at the cut (a third of 18) are trials 0-5, so the paused ones
    among them (0, 1, 3, 4, 5) are continued, best first, 9 epochs each, while the budget affords them."""
    study, curves = _study(), _second_best_at_the_cut_judged_early()
    assert [_play(study, curve) for curve in curves.values()] == [3, 3, 12] + [3] * 15  # 63 epochs
    pruner = study.pruner
    continued = []
    while (paused := pruner.to_continue(study)) is not None:
        continued.append(paused.number)
        assert _continue(study, paused, curves[paused.number]) == 9
    assert continued == [0, 1, 3, 4, 5]
    assert sum(len(trial.intermediate_values) for trial in study.trials) == 108
    assert [continues(trial) for trial in study.trials[18:]] == [0, 1, 3, 4, 5]
    assert study.best_trial.number == 18 and study.best_value == pytest.approx(curves[0][-1])  # trial 0 continued


def test_a_paused_trial_below_the_best_third_at_the_cut_is_never_continued_however_much_budget_is_left():
    """Trial 0 ends at its third epoch (early stopping) and every later one is behind all before it at the cut:
    54 epochs are left. The best six at the cut are trials 0-5; after trials 1-5 (45 epochs) 9 are left, enough
    for trial 6, which ranks seventh: it is not continued."""
    study = _study()
    assert _play(study, _curve(0.90)[:3]) == 3
    for number in range(1, 18):
        assert _play(study, _curve(0.80 - 0.01 * number)) == 3
    continued = []
    while (paused := study.pruner.to_continue(study)) is not None:
        continued.append(paused.number)
        _continue(study, paused, _curve(0.80 - 0.01 * paused.number))
    assert continued == [1, 2, 3, 4, 5]
    assert sum(len(trial.intermediate_values) for trial in study.trials) == 108 - 9


def test_nothing_is_continued_before_every_trial_has_started_nor_what_running_trials_may_still_train():
    study, curves = _study(), _second_best_at_the_cut_judged_early()
    for number in range(16):
        _play(study, curves[number])
    assert study.pruner.to_continue(study) is None  # trials 16 and 17 have not started
    running = [study.ask(), study.ask()]  # trials 16 and 17, in other processes: at their cut, 9 epochs to go
    for trial in running:
        for epoch in range(3):
            trial.report(curves[trial.number][epoch], epoch)
    # 108 - 63 spent - 18 the running trials may still train: 27 epochs, three continuations
    continued = []
    while (paused := study.pruner.to_continue(study)) is not None:
        continued.append(paused.number)
        _continue(study, paused, curves[paused.number])
    assert continued == [0, 1, 3]
    for trial in running:  # both stopped at the cut: their 18 epochs are free again
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    while (paused := study.pruner.to_continue(study)) is not None:
        continued.append(paused.number)
        _continue(study, paused, curves[paused.number])
    assert continued == [0, 1, 3, 4, 5]
    assert sum(len(trial.intermediate_values) for trial in study.trials) == 108
