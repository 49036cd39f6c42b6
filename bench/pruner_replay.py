"""Pruning rules replayed on recorded learning curves: which rule keeps the trials that end best, at what cost.

    .venv/bin/python bench/sweep_search.py --dataset ../shared/data/fashion-mnist --epochs 12 \
        --seeds 1 2 3 4 5 6 --searches grid --keep /tmp/grid
    .venv/bin/python bench/pruner_replay.py --store /tmp/grid/mlflow.db --seeds 1 2 3 4 --orders 100

A grid sweep trains every point fully, so its runs hold each point's whole `val_accuracy` curve and its
final `test_accuracy`. This script feeds those curves to pruners (Optuna's, and the sweep's BudgetPruner),
epoch by epoch, exactly as `TrialPruning` does in a sweep (`trial.report(val_accuracy, epoch)`, then
`should_prune()`; never at the last epoch), with the trials in many random orders, and with a BudgetPruner
continues the paused trials it names, as the sweep does. Per rule and seed it
reports how often the best finished trial is within `--within` points of the grid's best test accuracy,
and the epochs spent as a share of the grid's. A random order stands in for the sampler: what a rule does
with trials as they come. Nothing is trained: 100 orders of 18 trials per rule and seed take about two
minutes for four seeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import random
from collections.abc import Callable

import optuna
import pandas as pd
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.experiments.pruning import CONTINUES_ATTR, BudgetPruner


@dataclasses.dataclass(frozen=True)
class Curve:
    """One fully trained grid point: its per-epoch validation accuracy and its final test accuracy."""

    params: str
    val_accuracy: tuple[float, ...]
    test_accuracy: float


def load_curves(client: MlflowClient, experiment_name: str) -> list[Curve]:
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no experiment {experiment_name!r} in the store")
    runs = client.search_runs([experiment.experiment_id], f"tags.{names.TAG_TRIAL_STATE} = 'finished'",
                              max_results=1000)
    curves = []
    for run in runs:
        history = sorted(client.get_metric_history(run.info.run_id, names.VAL_ACCURACY), key=lambda m: m.step)
        params = ", ".join(f"{key}={run.data.params[key]}" for key in ("learning_rate", "dropout", "hidden_units"))
        curves.append(Curve(params, tuple(m.value for m in history), run.data.metrics[names.TEST_ACCURACY]))
    return curves


def replay(curves: list[Curve], order: list[int], pruner: optuna.pruners.BasePruner,
           epochs: int) -> tuple[float, int]:
    """The best finished test accuracy and the epochs trained, with the trials in `order`; then, as a sweep does
    with a BudgetPruner, the paused trials it names continued from their last epoch. A continued trial is taken to
    end as the grid point trained without a pause did (its final test accuracy)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", pruner=pruner, sampler=optuna.samplers.RandomSampler(0))
    best, spent = float("-inf"), 0
    for index in order:
        trained, accuracy = _play(study, study.ask(), curves[index], 0, epochs)
        spent, best = spent + trained, max(best, accuracy)
    while isinstance(pruner, BudgetPruner) and (paused := pruner.to_continue(study)) is not None:
        study.enqueue_trial({}, user_attrs={CONTINUES_ATTR: paused.number})
        curve = curves[order[paused.number]]  # the trials of `order` are numbered in it
        trained, accuracy = _play(study, study.ask(), curve, len(paused.intermediate_values), epochs)
        spent, best = spent + trained, max(best, accuracy)
    return best, spent


def _play(study: optuna.Study, trial: optuna.Trial, curve: Curve, start: int, epochs: int) -> tuple[int, float]:
    """`curve` reported from epoch `start` as TrialPruning does; the epochs trained and the test accuracy when the
    trial finished (else -inf)."""
    for epoch in range(start, len(curve.val_accuracy)):
        trial.report(curve.val_accuracy[epoch], epoch)
        if epoch + 1 < epochs and trial.should_prune():
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            return epoch + 1 - start, float("-inf")
    study.tell(trial, curve.test_accuracy)
    return len(curve.val_accuracy) - start, curve.test_accuracy


def _budget(cut: int, share: float = 0.5) -> Callable[[int, int], optuna.pruners.BasePruner]:
    return lambda trials, epochs: BudgetPruner(trials, epochs, share, cut)


class _FirstGoesOn(BudgetPruner):
    """The budget rule keeping the best max(1, floor(n * keep)) at the cut: the first trial always goes on."""

    def _places(self, reached: int) -> int:
        return max(1, math.floor(reached * self.keep))


class _NoContinuation(_FirstGoesOn):
    """The budget rule as it was until 2026-12-07: the first trial goes on, a paused trial is never continued."""

    def to_continue(self, study: optuna.Study) -> None:
        return None


class _AllPaused(BudgetPruner):
    """Synchronous successive halving on the budget: every trial pauses at the cut, and the best third there of all
    the trials is continued at the end."""

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        return trial.last_step == self.cut - 1 or super().prune(study, trial)


class _RoundingUp(BudgetPruner):
    """The budget rule keeping ceil(n * keep) trials at the cut rather than floor (at least one): more of the
    first few trials go on."""

    def _places(self, reached: int) -> int:
        return max(1, math.ceil(reached * self.keep))


def _median(startup: int, warm_up: int, interval: int = 1) -> Callable[[int, int], optuna.pruners.BasePruner]:
    return lambda trials, epochs: optuna.pruners.MedianPruner(startup, warm_up, interval)


def _halving(min_resource: int, factor: int) -> Callable[[int, int], optuna.pruners.BasePruner]:
    return lambda trials, epochs: optuna.pruners.SuccessiveHalvingPruner(min_resource, factor)


RULES: dict[str, Callable[[int, int], optuna.pruners.BasePruner]] = {
    "budget: ASHA's promotion, paused trials continued (default)": BudgetPruner,
    "budget: the first trial goes on, paused trials continued": _FirstGoesOn,
    "budget: every trial paused at the cut, the best third continued": _AllPaused,
    "budget: the first trial goes on, never continued (until 2026-12-07)": _NoContinuation,
    "budget, keeping ceil(n/3)": lambda trials, epochs: _RoundingUp(trials, epochs),
    "budget cut 2": _budget(2),
    "budget cut 4": _budget(4),
    "budget cut 3 share .45": _budget(3, 0.45),
    "median(3, warm-up 2)": _median(3, 2),
    "median(3, warm-up 1)": _median(3, 1),
    "median(3, warm-up 2, every 3rd)": _median(3, 2, 3),
    "median(2, warm-up 2, every 3rd)": _median(2, 2, 3),
    "percentile 25 (3, warm-up 2, every 3rd)": lambda trials, epochs: optuna.pruners.PercentilePruner(25, 3, 2, 3),
    "percentile 33 (2, warm-up 2, once)": lambda trials, epochs: optuna.pruners.PercentilePruner(33, 2, 2, 99),
    **{f"successive halving 1/{factor} from epoch {minimum + 1}": _halving(minimum, factor)
       for minimum, factor in ((1, 2), (2, 2), (2, 3), (2, 4), (2, 5), (2, 6), (3, 4), (3, 5))},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", required=True, help="the SQLite file of bench/sweep_search.py --keep")
    parser.add_argument("--seeds", nargs="+", default=["1", "2", "3"])
    parser.add_argument("--orders", type=int, default=300, help="random trial orders per seed")
    parser.add_argument("--epochs", type=int, default=12)
    parser.add_argument("--within", type=float, default=0.3, help="points of accuracy from the grid's best")
    arguments = parser.parse_args()
    client = MlflowClient(f"sqlite:///{arguments.store}")
    rows, ranks = [], []
    for seed in arguments.seeds:
        curves = load_curves(client, f"grid-seed{seed}")
        grid_best = max(curve.test_accuracy for curve in curves)
        grid_epochs = sum(len(curve.val_accuracy) for curve in curves)
        orders = [random.Random(number).sample(range(len(curves)), len(curves)) for number in range(arguments.orders)]
        for rule, make in RULES.items():
            results = [replay(curves, order, make(len(curves), arguments.epochs), arguments.epochs)
                       for order in orders]
            gaps = [(grid_best - best) * 100 for best, _ in results]
            shares = [spent / grid_epochs for _, spent in results]
            rows.append({"seed": seed, "rule": rule,
                         "within": sum(gap <= arguments.within for gap in gaps) / len(gaps),
                         "both": sum(gap <= arguments.within and share <= 0.5
                                     for gap, share in zip(gaps, shares, strict=True)) / len(gaps),
                         "gap_mean_pt": sum(gaps) / len(gaps), "gap_worst_pt": max(gaps),
                         "epochs_mean": sum(shares) / len(shares), "epochs_worst": max(shares)})
        ranks.append({"seed": seed} | {
            f"epoch {epoch + 1}": pd.Series([curve.val_accuracy[epoch] for curve in curves]).corr(
                pd.Series([curve.test_accuracy for curve in curves]), method="spearman")
            for epoch in range(arguments.epochs)})
    print("How well each epoch's val_accuracy ranks the grid points' final test_accuracy (Spearman):")
    print(pd.DataFrame(ranks).round(2).to_string(index=False))
    frame = pd.DataFrame(rows)
    print(frame.round(3).to_string(index=False))
    print(frame.groupby("rule")[["within", "both", "gap_mean_pt", "epochs_mean", "epochs_worst"]].mean()
          .round(3).sort_values("both", ascending=False).to_string())


if __name__ == "__main__":
    main()
