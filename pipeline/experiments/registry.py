"""The model registry: register a training run's model, and keep the `champion` alias on the best.

The rules, as `register` and `train --register-as` apply them:

- A run's model is registered once: registering the same run again returns its existing version.
- A version is tagged with its run id, the run's final metrics and the dataset digest.
- The alias `champion` (aliases, not the deprecated stages) points at the best registered version
  by the model's one champion rule, stored with it (tag `champion_rule`): a metric and a mode, ranked by
  `pipeline.experiments.runs.Ranking` (the metric, then the lower test_loss, then the earlier run).
  Registering a run that does not beat the champion adds a version and leaves the alias.
- The model's first registration sets its rule (`register`: its metric and mode; `train --register-as`:
  the default, test_accuracy max). A registration by another rule is refused before it writes anything,
  unless it asks to change the rule (`change_rule`): then the rule is replaced and the champion re-picked by
  it. `train --register-as` always uses the model's rule. A model without the tag (registered before rules
  were stored) has the default rule, written at its next registration.

Concurrent `register` processes are safe: see `pipeline.experiments.registry_writes`.
"""

from __future__ import annotations

import dataclasses
import logging

from mlflow.entities import Run, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.errors import ChampionRuleError, RunSelectionError
from pipeline.experiments.registry_writes import (
    champion_candidates,
    champion_version,
    create_registered_model,
    ensure_version,
    rule_of,
    run_or_none,
    set_rule,
    settle_champion,
    stored_rule_text,
    versions_of_run,
)
from pipeline.experiments.runs import Ranking, best_registrable_run, logged_models_by_run

logger = logging.getLogger(__name__)

# The version label of a run that a dry run would register.
NEW_VERSION = "new"


@dataclasses.dataclass(frozen=True)
class Registration:
    """What `register` did, or in a dry run would do, and why.

    Args:
        model_name: the registered model.
        run_id: the run whose model was registered.
        run_summary: the run's ranking metric and test_loss, for messages.
        version: the run's version; NEW_VERSION in a dry run that would create it.
        created: whether a new version was (or would be) created.
        champion_version: the version the `champion` alias points at afterwards (or would), if any.
        champion_moved: whether the alias moved to this run's version (or would).
        reason: why the alias moved or stayed, in one sentence.
        dry_run: nothing was written.
        rule: the champion rule the decision was taken by (`Ranking.rule_text`).
        replaced_rule: the model's rule that this registration replaced (or would), if it changed it.
    """

    model_name: str
    run_id: str
    run_summary: str
    version: str
    created: bool
    champion_version: str | None
    champion_moved: bool
    reason: str
    dry_run: bool = False
    rule: str = Ranking().rule_text
    replaced_rule: str | None = None

    def summary_lines(self) -> list[str]:
        """Lines for the console: the version, the champion decision, and a change of the rule, if any."""
        if not self.created:
            registered = f"Run {self.run_id} is already {self.model_name} version {self.version} (no new version)"
        elif self.dry_run:
            registered = f"Dry run: would register a new version of {self.model_name} for run {self.run_id}"
        else:
            registered = f"Registered {self.model_name} version {self.version} for run {self.run_id}"
        lines = [f"{registered} ({self.run_summary})", self.reason]
        if self.replaced_rule is not None:
            lines.append(
                f"{self.model_name}'s champion rule {'would change' if self.dry_run else 'changed'} from "
                f"'{self.replaced_rule}' to '{self.rule}'"
            )
        return lines


@dataclasses.dataclass(frozen=True)
class _Rule:
    """The champion rule a registration applies.

    Args:
        ranking: the rule.
        requested: the rule the caller asked for (None: the model's own).
        change_rule: the caller asked to replace the model's rule by `requested`.
        replaced: the model's rule (as stored) that `ranking` replaces; None when it does not change.
        write: the model exists and its tag must be written (a change, or a model without the tag).
        new_model: the model did not exist: the registration creates it with `ranking`.
    """

    ranking: Ranking
    requested: Ranking | None
    change_rule: bool
    replaced: str | None = None
    write: bool = False
    new_model: bool = False


def _rule_to_apply(client: MlflowClient, model_name: str, requested: Ranking | None, change_rule: bool) -> _Rule:
    """The rule a registration by `requested` applies to `model_name` (see the module's docstring).

    Raises:
        ChampionRuleError: the model has another rule and `change_rule` is false.
    """
    try:
        model = client.get_registered_model(model_name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return _Rule(requested or Ranking(), requested, change_rule, new_model=True)  # created with it
    text = stored_rule_text(model)
    if change_rule and requested is not None and (text is None or Ranking.from_rule_text(text) != requested):
        return _Rule(requested, requested, change_rule, replaced=text or Ranking().rule_text, write=True)
    current = rule_of(model)
    if requested is None or requested == current:
        return _Rule(current, requested, change_rule, write=text is None)
    raise ChampionRuleError(
        f"registered model {model_name} picks its champion by '{current.rule_text}' ({current.in_words()}), "
        f"not by '{requested.rule_text}': register with metric={current.metric} mode={current.mode}, "
        f"or with change_rule=true to pick it by '{requested.rule_text}' from now on"
    )


def record_registration(client: MlflowClient, run_id: str, registration: Registration) -> None:
    """Tags a registration run (the one `mlflow run -e register` created) with what it decided."""
    tags = {  # its run_type is already set (pipeline.experiments.runs.open_workspace)
        names.TAG_REGISTERED_MODEL: registration.model_name,
        names.TAG_REGISTERED_VERSION: registration.version,
        names.TAG_REGISTERED_RUN_ID: registration.run_id,
        names.TAG_CHAMPION_VERSION: registration.champion_version or "",
        names.TAG_REGISTRATION_DECISION: registration.reason,
    }
    client.log_batch(run_id, tags=[RunTag(key, value) for key, value in tags.items()])


def register_best_run(
    client: MlflowClient,
    experiment_id: str,
    model_name: str,
    ranking: Ranking,
    dry_run: bool = False,
    change_rule: bool = False,
) -> Registration:
    """Registers the experiment's best finished training run by `ranking` under `model_name`.

    `ranking` must be the model's champion rule (it becomes the rule of a new model), unless
    `change_rule`: then it replaces the model's rule, and the champion is re-picked by it.

    Raises:
        ChampionRuleError: the model has another rule, and `change_rule` is false.
        RunSelectionError: no finished training run with a logged model and the metric.
        RecordingError: concurrent writers kept the champion from settling.
    """
    rule = _rule_to_apply(client, model_name, ranking, change_rule)
    run, model_id = best_registrable_run(client, client.get_experiment(experiment_id), ranking)
    return _register(client, run, model_id, model_name, rule, dry_run)


def register_run(
    client: MlflowClient,
    run_id: str,
    model_name: str,
    ranking: Ranking | None = None,
    dry_run: bool = False,
    change_rule: bool = False,
) -> Registration:
    """Registers one run's logged model under `model_name`, then applies the model's champion rule.

    Args:
        client: the tracking (and registry) client.
        run_id: a finished training run with a logged model `model`.
        model_name: the registered model; created if missing.
        ranking: the rule the caller ranks by; None: the model's rule (higher test_accuracy for a new model).
        dry_run: decide only; write nothing.
        change_rule: make `ranking` the model's rule, and re-pick the champion by it.

    Raises:
        ChampionRuleError: `ranking` is not the model's rule, and `change_rule` is false.
        RunSelectionError: the run has no logged model.
        RecordingError: concurrent writers kept the champion from settling.
    """
    rule = _rule_to_apply(client, model_name, ranking, change_rule)
    run = client.get_run(run_id)
    model_id = logged_models_by_run(client, run.info.experiment_id, run_id).get(run_id)
    if model_id is None:
        raise RunSelectionError(f"run {run_id} has no logged model '{names.MODEL_NAME}' to register")
    return _register(client, run, model_id, model_name, rule, dry_run)


def _register(
    client: MlflowClient, run: Run, model_id: str, model_name: str, rule: _Rule, dry_run: bool
) -> Registration:
    """register_run for a run whose logged model is known."""
    if dry_run:
        return _plan(client, model_name, run, rule)
    # an existing model is not created again: that write would wait behind another process's version being created
    if not (rule.new_model and create_registered_model(client, model_name, rule.ranking)):
        # it existed, or another process created it meanwhile (with its own rule): decide again
        rule = _rule_to_apply(client, model_name, rule.requested, rule.change_rule)
        if rule.write:
            set_rule(client, model_name, rule.ranking)
            if rule.replaced is not None:
                logger.info("%s picks its champion by '%s' from now on (was '%s')",
                            model_name, rule.ranking.rule_text, rule.replaced)
    previous = champion_version(client, model_name)
    version, created = ensure_version(client, model_name, run, model_id)
    champion, ranking = settle_champion(client, model_name)
    decision = _Decision(str(version.version), created, previous, champion)
    return _outcome(client, model_name, run, ranking, decision, replaced_rule=rule.replaced)


def _plan(client: MlflowClient, model_name: str, run: Run, rule: _Rule) -> Registration:
    """The decision register_run would take, computed without writing."""
    ranking = rule.ranking
    try:
        previous = champion_version(client, model_name)
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        version, previous, candidates = NEW_VERSION, None, []
    else:
        existing = versions_of_run(client, model_name, run.info.run_id)
        version = str(existing[0].version) if existing else NEW_VERSION
        candidates = champion_candidates(client, model_name, ranking)
    if version == NEW_VERSION and ranking.has_metric(run):
        candidates = sorted(candidates + [(NEW_VERSION, run)], key=lambda candidate: ranking.key(candidate[1]))
    champion = candidates[0][0] if candidates else previous
    decision = _Decision(version, version == NEW_VERSION, previous, champion)
    return _outcome(client, model_name, run, ranking, decision, dry_run=True, replaced_rule=rule.replaced)


@dataclasses.dataclass(frozen=True)
class _Decision:
    """The run's version (NEW_VERSION in a dry run that would create it), whether it is new, and the
    champion version before and after."""

    version: str
    created: bool
    previous: str | None
    champion: str | None


def _outcome(
    client: MlflowClient,
    model_name: str,
    run: Run,
    ranking: Ranking,
    decision: _Decision,
    dry_run: bool = False,
    replaced_rule: str | None = None,
) -> Registration:
    version, previous, champion = decision.version, decision.previous, decision.champion
    alias = f"{model_name}@{names.CHAMPION_ALIAS}"
    ours = champion == version
    label = "a new version" if version == NEW_VERSION else f"version {version}"
    if ours and previous == champion:
        reason = f"{alias} already points at {label}"
    elif ours:
        why = "there was no champion" if previous is None else (
            f"it beats version {previous} ({_version_summary(client, model_name, previous, ranking)})"
        )
        reason = f"{alias} {'would move' if dry_run else 'moved'} to {label}: {why}"
    elif champion != previous and champion is not None:  # the rule changed, or a concurrent registration won
        reason = (
            f"{alias} {'would move' if dry_run else 'moved'} to version {champion} "
            f"({_version_summary(client, model_name, champion, ranking)}), the best by {ranking.in_words()}; "
            "this run does not beat it"
        )
    elif not ranking.has_metric(run):
        reason = f"{alias} {'would not move' if dry_run else 'did not move'}: the run has no {ranking.metric!r}"
    else:
        reason = (
            f"{alias} {'would stay at' if dry_run else 'stays at'} version {champion} "
            f"({_version_summary(client, model_name, champion, ranking)}): this run does not beat it "
            f"({ranking.in_words()}; ties go to the lower test_loss, then the earlier run)"
        )
    return Registration(
        model_name=model_name,
        run_id=run.info.run_id,
        run_summary=ranking.describe(run),
        version=version,
        created=decision.created,
        champion_version=champion,
        champion_moved=ours and previous != champion,
        reason=reason,
        dry_run=dry_run,
        rule=ranking.rule_text,
        replaced_rule=replaced_rule,
    )


def _version_summary(client: MlflowClient, model_name: str, version: str, ranking: Ranking) -> str:
    """'run <id>, test_accuracy=..., test_loss=...' of a version, for the reason of a decision."""
    try:
        run_id = client.get_model_version(model_name, version).run_id
    except MlflowException as error:  # deleted meanwhile, as a concurrent duplicate
        if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            raise
        return "since deleted"
    run = run_or_none(client, run_id) if run_id else None
    return f"run {run_id}, {ranking.describe(run)}" if run else f"run {run_id}"
