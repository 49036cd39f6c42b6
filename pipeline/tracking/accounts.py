"""The team server's accounts per job: a training account and a serving account, set up idempotently.

The compose `mlflow` service (and the native launcher, when given the accounts' settings) runs
`docker/create-accounts.py` beside the server at every start; it calls `ensure_accounts` with the admin's
credentials, through MLflow's public auth client (`mlflow.server.get_app_client("basic-auth", ...)`) and
`MlflowClient`. Each start makes the server match the settings: a missing account is created, an existing
one gets the password of the settings, and each grant below is made unless the account already holds a
grant on that resource (so that what the admin changed by hand, and the MANAGE that MLflow gives the
creator of a registered model, stay). Nothing else is touched.

What each account may do beyond the server's default permission (docs/team-server.md has the whole table):

- training: EDIT on the training experiment (created here when missing, so that the serving account can
  be granted READ on it) and on the served registered model; like every signed-in user it creates
  experiments and registered models, and manages what it created. It is no admin: it cannot manage users.
- serving: READ on the served registered model, and READ on the training experiment, because MLflow checks
  a download of a model's files against the experiment that logged it. Nothing else is granted, and the
  server app (`server_app.py`) refuses every write of a read-only account (MLflow lets any signed-in user
  create experiments and registered models).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode
from mlflow.server import get_app_client
from mlflow.tracking import MlflowClient

logger = logging.getLogger(__name__)

EXPERIMENT = "experiment"
REGISTERED_MODEL = "registered_model"
READ, EDIT = "READ", "EDIT"


@dataclass(frozen=True)
class Account:
    username: str
    password: str


@dataclass(frozen=True)
class Grant:
    resource_type: str
    resource_id: str
    permission: str


def training_grants(experiment_id: str, model_name: str) -> tuple[Grant, ...]:
    return (Grant(EXPERIMENT, experiment_id, EDIT), Grant(REGISTERED_MODEL, model_name, EDIT))


def serving_grants(experiment_id: str, model_name: str) -> tuple[Grant, ...]:
    return (Grant(EXPERIMENT, experiment_id, READ), Grant(REGISTERED_MODEL, model_name, READ))


def ensure_accounts(tracking_uri: str, training: Account, serving: Account, experiment_name: str,
                    model_name: str) -> list[str]:
    """Creates or updates both accounts and their grants; returns one line per thing done.

    The caller signs in as the admin (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD).

    Raises:
        ValueError: the two accounts share a user name.
        MlflowException: the server refused a step (the admin's credentials are wrong, ...).
    """
    if training.username == serving.username:
        raise ValueError(f"the training and the serving account are both {training.username!r}: give each its own")
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    done = [_ensure_user(auth, account) for account in (training, serving)]
    experiment_id, created = _ensure_experiment(MlflowClient(tracking_uri), experiment_name)
    if created:
        done.append(f"experiment {experiment_name} created (id {experiment_id})")
    for account, grants in ((training, training_grants(experiment_id, model_name)),
                            (serving, serving_grants(experiment_id, model_name))):
        granted = [grant for grant in grants if _ensure_grant(auth, account.username, grant)]
        if granted:
            done.append(f"{account.username} granted " + ", ".join(
                f"{grant.permission} on {grant.resource_type} {grant.resource_id}" for grant in granted))
    return done


def _ensure_user(auth, account: Account) -> str:
    try:
        auth.create_user(account.username, account.password)
        return f"user {account.username} created"
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
    auth.update_user_password(account.username, account.password)
    return f"user {account.username} exists; password set from the settings"


def _ensure_experiment(client: MlflowClient, name: str) -> tuple[str, bool]:
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id, False
    try:
        return client.create_experiment(name), True
    except MlflowException as error:  # created meanwhile by a training
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return client.get_experiment_by_name(name).experiment_id, False


def _ensure_grant(auth, username: str, grant: Grant) -> bool:
    """Grants it unless the user already holds a grant on that resource (the admin's change, or the MANAGE
    MLflow gives the creator of a resource, stays); says whether it granted."""
    try:
        auth.grant_user_permission(username, grant.resource_type, grant.resource_id, grant.permission)
        return True
    except MlflowException as error:
        if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
            raise
        return False


def teammate_grants() -> tuple[Grant, ...]:
    """What a teammate gets when added: READ on every experiment and registered model (the stack's default
    permission is NO_PERMISSIONS, so that the serving account sees nothing else)."""
    return (Grant(EXPERIMENT, "*", READ), Grant(REGISTERED_MODEL, "*", READ))


def add_teammate(tracking_uri: str, teammate: Account) -> None:
    """Creates a teammate's account with READ on everything (see teammate_grants); the caller is the admin.

    Raises:
        MlflowException: the user exists, or the server refused (the caller is no admin, ...).
    """
    auth = get_app_client("basic-auth", tracking_uri=tracking_uri)
    auth.create_user(teammate.username, teammate.password)
    for grant in teammate_grants():
        _ensure_grant(auth, teammate.username, grant)
