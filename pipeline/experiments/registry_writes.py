"""The registry's writes, safe when several `register` processes race.

MLflow's registry has no transactions, so concurrent `register` processes may both create a version
of the same run, or move the alias at the same time. And MLflow's HTTP client re-sends a request that
got no answer within MLFLOW_HTTP_REQUEST_TIMEOUT: a create that waited in a slow server then lands
twice, the first copy possibly after the answer to the second. Each process therefore, after its writes:

1. keeps only the lowest-numbered version of its run and deletes the later duplicates (versions are
   numbered in creation order, so every process agrees on which one survives). Each create carries a
   token of its own (version tag `registration_token`); when the call took longer than the HTTP timeout,
   the process first waits (at most STRAY_WAIT_SECONDS) until every copy it may have sent is in the
   registry, so that a late copy is deleted too. Settling the champion also deletes the later
   duplicates of every run of the model, so a copy later still is deleted by the next registration;
2. re-reads the model's champion rule, the versions, then the alias, and moves the alias to the best
   version by that rule until it reads it back unchanged. The last process to move the alias re-reads
   after its write and sees every version created before, and any version created later (or a rule
   changed later) is checked by the process that created it; so all of them end agreeing on the best
   version of all, by the model's one rule.

The rule is stored with the registered model (tag `champion_rule`), never taken from the caller: a
process that registers by another rule is refused before it writes (`pipeline.experiments.registry`),
and one that changes the rule writes the tag before it settles. A new model is created with its rule in
the same call, so processes creating it at once all read the winner's rule.
"""

from __future__ import annotations

import logging
import time
import uuid

from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion, RegisteredModel
from mlflow.environment_variables import MLFLOW_HTTP_REQUEST_MAX_RETRIES, MLFLOW_HTTP_REQUEST_TIMEOUT
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, RESOURCE_DOES_NOT_EXIST, ErrorCode
from mlflow.tracking import MlflowClient

from pipeline import constants as names
from pipeline.errors import ChampionRuleError, RecordingError
from pipeline.experiments.runs import Ranking, all_pages
from pipeline.tracking.retry import Backoff, retry

logger = logging.getLogger(__name__)

# Rounds of "re-read, move the alias" before concurrent writers are declared not to settle, and
# attempts of a write that lost a race (e.g. two processes numbering a version at once).
MAX_SETTLE_ROUNDS = 20
MAX_WRITE_ATTEMPTS = 5
# Short random pauses between those rounds and attempts (50-300 ms), so that racing processes part.
RACE_BACKOFF = Backoff(first=0.3, longest=0.3, jitter=0.85)
# How long a create whose request may have been re-sent waits for the copies it sent to land.
STRAY_WAIT_SECONDS = 30.0


def champion_version(client: MlflowClient, model_name: str) -> str | None:
    """The version the alias points at, as text (stores answer with int or str versions)."""
    version = client.get_registered_model(model_name).aliases.get(names.CHAMPION_ALIAS)
    return None if version is None else str(version)


def create_registered_model(client: MlflowClient, model_name: str, rule: Ranking) -> bool:
    """Creates the registered model with its champion rule unless it exists (another process may create
    it at the same time: then the winner's rule is the model's); whether this call created it."""
    try:
        client.create_registered_model(model_name, tags={names.TAG_CHAMPION_RULE: rule.rule_text})
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return False
    return True


def stored_rule_text(model: RegisteredModel) -> str | None:
    """The model's `champion_rule` tag as stored, None when it has none (registered before rules were stored,
    or created by hand)."""
    return model.tags.get(names.TAG_CHAMPION_RULE)


def model_rule(client: MlflowClient, model_name: str) -> Ranking:
    """The rule that picks the model's champion: its `champion_rule` tag; the default ranking when it has none.

    Raises:
        ChampionRuleError: the tag is not a rule (edited by hand).
    """
    return rule_of(client.get_registered_model(model_name))


def rule_of(model: RegisteredModel) -> Ranking:
    """`model_rule` of a registered model already read."""
    text = stored_rule_text(model)
    if text is None:
        return Ranking()
    rule = Ranking.from_rule_text(text)
    if rule is None:
        raise ChampionRuleError(
            f"registered model {model.name} has tag {names.TAG_CHAMPION_RULE}={text!r}, which is not a rule: "
            f"allowed is '<metric> max' or '<metric> min' (e.g. '{Ranking().rule_text}'); "
            "register with change_rule=true to set it"
        )
    return rule


def set_rule(client: MlflowClient, model_name: str, rule: Ranking) -> None:
    """Stores `rule` as the model's champion rule."""
    client.set_registered_model_tag(model_name, names.TAG_CHAMPION_RULE, rule.rule_text)


def versions_of_run(client: MlflowClient, model_name: str, run_id: str) -> list[ModelVersion]:
    """The run's versions of the model, lowest number first."""
    found = client.search_model_versions(f"name = '{model_name}' and run_id = '{run_id}'")
    return sorted(found, key=lambda version: int(version.version))


def _all_versions(client: MlflowClient, model_name: str) -> list[ModelVersion]:
    return list(all_pages(lambda token: client.search_model_versions(f"name = '{model_name}'", page_token=token)))


def _version_tags(run: Run) -> dict[str, str]:
    metrics = {key: repr(value) for key, value in sorted(run.data.metrics.items())}
    return {
        names.TAG_VERSION_RUN_ID: run.info.run_id,
        names.TAG_DATASET_DIGEST: run.data.tags.get(names.TAG_DATASET_DIGEST, ""),
    } | metrics


def ensure_version(client: MlflowClient, model_name: str, run: Run, model_id: str) -> tuple[ModelVersion, bool]:
    """The run's one version of the model, created if missing; later duplicates are deleted, also those
    that copies of this call's own request create late (see the module's docstring)."""
    run_id = run.info.run_id
    existing = versions_of_run(client, model_name, run_id)
    if existing:
        return existing[0], False
    token = uuid.uuid4().hex
    calls = 0

    def create() -> ModelVersion:
        nonlocal calls
        calls += 1
        return client.create_model_version(
            model_name,
            source=f"models:/{model_id}",
            run_id=run_id,
            tags=_version_tags(run) | {names.TAG_REGISTRATION_TOKEN: token},
            description=f"Training run {run_id}; its metrics and dataset digest are the version's tags.",
            model_id=model_id,
        )

    started = time.monotonic()
    created = retry(create, MAX_WRITE_ATTEMPTS, RACE_BACKOFF, _lost_a_race)
    _await_copies(client, model_name, run_id, token, _copies_sent(calls, time.monotonic() - started))
    keep = _delete_duplicates(client, model_name, versions_of_run(client, model_name, run_id)) or created
    return keep, str(keep.version) == str(created.version)


def _copies_sent(calls: int, seconds: float) -> int:
    """How many copies of a create request may land when `calls` calls took `seconds` in all, the last one
    answered: MLflow's HTTP client re-sends a request after each MLFLOW_HTTP_REQUEST_TIMEOUT without an
    answer, at most MLFLOW_HTTP_REQUEST_MAX_RETRIES times per call (a call refused outright created none)."""
    timeout = MLFLOW_HTTP_REQUEST_TIMEOUT.get()
    per_call = MLFLOW_HTTP_REQUEST_MAX_RETRIES.get() + 1
    return 1 + min(int(seconds // timeout), calls * per_call - 1)  # the answered copy, and those that timed out


def _await_copies(client: MlflowClient, model_name: str, run_id: str, token: str, sent: int) -> None:
    """Waits until the registry holds `sent` versions of the run made by the create call `token` names (at
    most STRAY_WAIT_SECONDS: a copy lost on the way never lands)."""
    if sent <= 1:
        return
    deadline = time.monotonic() + STRAY_WAIT_SECONDS
    while True:
        landed = sum(v.tags.get(names.TAG_REGISTRATION_TOKEN) == token
                     for v in versions_of_run(client, model_name, run_id))
        if landed >= sent or time.monotonic() >= deadline:
            logger.info("%s: %d of the %d copies of run %s's create request landed", model_name, landed, sent, run_id)
            return
        time.sleep(0.2)


def _delete_duplicates(client: MlflowClient, model_name: str, versions: list[ModelVersion]) -> ModelVersion | None:
    """Deletes every version of `versions` (one run's) but the lowest-numbered; returns that one."""
    versions = sorted(versions, key=lambda version: int(version.version))
    for duplicate in versions[1:]:
        logger.info("Deleting %s version %s: a duplicate of version %s (run %s)",
                    model_name, duplicate.version, versions[0].version, duplicate.run_id)
        try:
            client.delete_model_version(model_name, duplicate.version)
        except MlflowException as error:
            if error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
                raise
    return versions[0] if versions else None


def delete_all_duplicates(client: MlflowClient, model_name: str) -> None:
    """Keeps the lowest-numbered version of each run of the model, deleting the others."""
    by_run: dict[str, list[ModelVersion]] = {}
    for version in _all_versions(client, model_name):
        if version.run_id:
            by_run.setdefault(version.run_id, []).append(version)
    for versions in by_run.values():
        if len(versions) > 1:
            _delete_duplicates(client, model_name, versions)


def champion_candidates(client: MlflowClient, model_name: str, ranking: Ranking) -> list[tuple[str, Run]]:
    """(version, run) of the versions that can be champion, best first: the lowest version of each
    run that still exists and has the ranking metric."""
    lowest: dict[str, ModelVersion] = {}
    for version in _all_versions(client, model_name):
        if version.run_id and (
            version.run_id not in lowest or int(version.version) < int(lowest[version.run_id].version)
        ):
            lowest[version.run_id] = version
    candidates: list[tuple[str, Run]] = []
    for run_id, version in lowest.items():
        run = run_or_none(client, run_id)
        if run is not None and ranking.has_metric(run):
            candidates.append((str(version.version), run))
    return sorted(candidates, key=lambda candidate: ranking.key(candidate[1]))


def run_or_none(client: MlflowClient, run_id: str) -> Run | None:
    """The run, or None if it was deleted."""
    try:
        return client.get_run(run_id)
    except MlflowException as error:
        if error.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def settle_champion(client: MlflowClient, model_name: str) -> tuple[str | None, Ranking]:
    """Deletes the later duplicates of every run of the model, then moves the champion alias to the best
    version by the model's stored rule until it reads back unchanged; returns it, and the rule it was picked by."""
    delete_all_duplicates(client, model_name)
    pauses = RACE_BACKOFF.pauses()
    for _ in range(MAX_SETTLE_ROUNDS):
        ranking = model_rule(client, model_name)  # each round: another process may have changed it
        candidates = champion_candidates(client, model_name, ranking)
        current = champion_version(client, model_name)
        if not candidates:
            return current, ranking
        best = candidates[0][0]
        if current == best:
            return best, ranking
        try:
            client.set_registered_model_alias(model_name, names.CHAMPION_ALIAS, best)
            logger.debug("Moved %s@%s from version %s to version %s",
                        model_name, names.CHAMPION_ALIAS, current, best)
        except MlflowException as error:  # lost a race (e.g. the version was just deleted): re-read
            logger.info("Moving %s@%s to version %s failed (%s); re-reading",
                        model_name, names.CHAMPION_ALIAS, best, error.message)
            time.sleep(next(pauses))
    raise RecordingError(
        f"the {names.CHAMPION_ALIAS} alias of {model_name} did not settle after {MAX_SETTLE_ROUNDS} rounds "
        "of concurrent changes; run register again"
    )


def _lost_a_race(error: Exception) -> bool:
    """A registry write worth another attempt: refused by the registry, for anything but a missing object."""
    return isinstance(error, MlflowException) and error.error_code != ErrorCode.Name(RESOURCE_DOES_NOT_EXIST)
