"""The Kubernetes recipe (deploy/kubernetes): manifests that agree with each other, and a TF_CONFIG
per pod that names every worker and the pod's own index; the pods start what the compose cluster starts
(the same image, entry point and environment names). No cluster is needed (nor used)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from mlflow_project.cluster_worker import STORAGE_VARIABLE
from pipeline.training.cluster import platform_tf_config, read_cluster
from tests.helpers import PROJECT_DIR, project_env

RECIPE = PROJECT_DIR / "deploy" / "kubernetes"
IMAGE = "mnist-pipeline-trainer"  # the compose `trainer` service's image (docker/trainer.Dockerfile)


def _documents() -> dict[str, dict]:
    """Every manifest the kustomization lists, by kind."""
    kustomization = yaml.safe_load((RECIPE / "kustomization.yaml").read_text())
    found = {"Kustomization": kustomization}
    for resource in kustomization["resources"]:
        for document in yaml.safe_load_all((RECIPE / resource).read_text()):
            assert document["kind"] not in found, document["kind"]
            found[document["kind"]] = document
    return found


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict]:
    return _documents()


def _container(job: dict) -> dict:
    [container] = job["spec"]["template"]["spec"]["containers"]
    return container


def _env(job: dict) -> dict[str, dict]:
    return {item["name"]: item for item in _container(job)["env"]}


def test_the_indexed_job_starts_one_pod_per_worker(manifests):
    job, env = manifests["Job"], _env(manifests["Job"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NUM_WORKERS"]["value"]) >= 2
    assert spec["backoffLimit"] == 0  # a lost worker cannot rejoin: the Job fails, no lone restart
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # pod i's name: <Job name>-i, in the headless Service's subdomain
    subdomain = job["spec"]["template"]["spec"]["subdomain"]
    assert env["WORKER_HOSTS"]["value"] == f"{job['metadata']['name']}-{{index}}.{subdomain}"


def test_the_headless_service_names_the_pods(manifests):
    job, service = manifests["Job"], manifests["Service"]
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == service["metadata"]["name"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    [container_port] = _container(job)["ports"]
    assert port["port"] == port["targetPort"] == container_port["containerPort"]
    assert port["port"] == int(_env(job)["WORKER_PORT"]["value"])


def _compose_service(name: str) -> dict:
    return yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())["services"][name]


def test_the_pods_start_what_the_compose_cluster_starts(manifests):
    """One source: the trainer image and the project's entry point, with the same variables, in both."""
    job, kustomization = manifests["Job"], manifests["Kustomization"]
    container, compose = _container(job), _compose_service("cluster-worker")
    assert container["image"] == compose["image"] == IMAGE
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]
    assert container["command"] == compose["entrypoint"] == ["python", "-m", "mlflow_project.cluster_worker", "train"]
    assert "--strategy" not in container["args"]  # the entry point sets it
    platform = {"NUM_WORKERS", "WORKER_HOSTS", "WORKER_PORT"}
    assert platform <= set(_env(job)) and platform <= set(compose["environment"])
    assert "WORKER_INDEX" in compose["environment"]  # Kubernetes sets JOB_COMPLETION_INDEX itself


def test_the_chief_reaches_the_tracking_server_with_credentials_from_a_secret(manifests):
    job, config_map = manifests["Job"], manifests["ConfigMap"]
    env = _env(job)
    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-credentials"
    assert "MLFLOW_TRACKING_URI" not in env
    [source] = _container(job)["envFrom"]
    assert source["configMapRef"]["name"] == config_map["metadata"]["name"]
    assert config_map["data"]["MLFLOW_TRACKING_URI"].startswith(("http://", "https://"))
    assert not any("password" in str(value).lower() for value in config_map["data"].values())


def test_each_pods_tf_config_names_every_worker_and_its_own_index(manifests):
    job, env = manifests["Job"], _env(manifests["Job"])
    num_workers = job["spec"]["completions"]
    pod_env = {name: item["value"] for name, item in env.items() if "value" in item}
    service = manifests["Service"]["metadata"]["name"]
    expected = tuple(
        f"{job['metadata']['name']}-{index}.{service}:{pod_env['WORKER_PORT']}" for index in range(num_workers)
    )
    for index in range(num_workers):
        text = platform_tf_config(pod_env | {"JOB_COMPLETION_INDEX": str(index)})
        cluster = read_cluster({"TF_CONFIG": text})  # the pipeline's own check accepts it
        assert cluster.addresses == expected
        assert (cluster.task_type, cluster.task_index, cluster.worker_id) == ("worker", index, index)
        assert cluster.is_chief == (index == 0)


def test_the_entrypoint_starts_the_trainer_with_its_tf_config_and_arguments(manifests, tmp_path):
    """Runs the entry point as the pod does; a bad parameter stops the trainer it started at once."""
    env = {name: item["value"] for name, item in _env(manifests["Job"]).items() if "value" in item}
    result = subprocess.run(
        [sys.executable, *_container(manifests["Job"])["command"][1:], "--epochs", "0"],  # as the pod runs it
        cwd=tmp_path, env=project_env(**env, JOB_COMPLETION_INDEX="1"),
        capture_output=True, text=True, timeout=60,
    )
    assert result.stdout.startswith('TF_CONFIG={"cluster": {"worker": ["mnist-train-0.mnist-train:2222"')
    assert '"task": {"type": "worker", "index": 1}' in result.stdout
    assert result.returncode == 2 and "error: parameter epochs='0' is invalid" in result.stderr


def test_the_walk_through_covers_every_step():
    readme = (RECIPE / "README.md").read_text()
    for step in ("docker build -f docker/trainer.Dockerfile", "kubectl create secret generic mlflow-credentials",
                 "kubectl apply -k deploy/kubernetes", "kubectl logs", "kubectl delete job"):
        assert step in readme, step
    assert "deploy/kubernetes/README.md" in (PROJECT_DIR / "README.md").read_text()


def test_the_sweep_job_runs_one_valid_search_in_every_pod_on_a_shared_study():
    kustomization = yaml.safe_load((RECIPE / "sweep" / "kustomization.yaml").read_text())
    [job] = [yaml.safe_load((RECIPE / "sweep" / resource).read_text()) for resource in kustomization["resources"]]
    [generated] = kustomization["configMapGenerator"]
    config_map = {"metadata": {"name": generated["name"]},
                  "data": dict(literal.split("=", 1) for literal in generated["literals"])}
    assert job["spec"]["parallelism"] == job["spec"]["completions"] >= 2
    container = _container(job)
    assert container["image"].startswith(IMAGE)
    # the compose cluster's sweep entry point, which takes the study database from OPTUNA_STORAGE
    assert container["command"] == _compose_service("cluster-sweep")["entrypoint"]
    assert container["command"] == ["python", "-m", "mlflow_project.cluster_worker", "sweep"]
    env = {item["name"]: item for item in container["env"]}
    assert env[STORAGE_VARIABLE]["valueFrom"]["secretKeyRef"] == {"name": "optuna-storage", "key": "url"}
    assert STORAGE_VARIABLE in _compose_service("cluster-sweep")["environment"]
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    assert set(config_map["data"]) == {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"}

    # every pod: the same named study on the Secret's database, and arguments the sweep command accepts
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args["--study"] and "--storage" not in args  # the entry point adds it from the Secret
    from pipeline.config import parse_parameters
    from pipeline.experiments.study import SearchPlan
    from pipeline.search_space import SWEEP_PARAMETERS

    values = {flag[2:].replace("-", "_"): value for flag, value in args.items()}
    plan = SearchPlan.from_options(parse_parameters(SWEEP_PARAMETERS, values))
    assert (plan.sampler, plan.pruner) == ("tpe", "median") and not plan.space.is_grid
