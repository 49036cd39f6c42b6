"""The Kubernetes recipe (deploy/kubernetes): manifests that agree with each other, and a TF_CONFIG
per pod that names every worker and the pod's own index. No cluster is needed (nor used)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from types import ModuleType

import pytest
import yaml

from pipeline.training.cluster import read_cluster
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


def _entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location("worker_entrypoint", RECIPE / "worker_entrypoint.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_indexed_job_starts_one_pod_per_worker(manifests):
    job, env = manifests["Job"], _env(manifests["Job"])
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == int(env["NUM_WORKERS"]["value"]) >= 2
    assert spec["backoffLimit"] == 0  # a lost worker cannot rejoin: the Job fails, no lone restart
    assert spec["template"]["spec"]["restartPolicy"] == "Never"
    # the pods learn their Job's name from the label Kubernetes puts on them
    assert env["JOB_NAME"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.labels['batch.kubernetes.io/job-name']"


def test_the_headless_service_names_the_pods(manifests):
    job, service = manifests["Job"], manifests["Service"]
    pod = job["spec"]["template"]
    assert service["spec"]["clusterIP"] == "None"
    assert pod["spec"]["subdomain"] == service["metadata"]["name"] == _env(job)["SERVICE_NAME"]["value"]
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    [port] = service["spec"]["ports"]
    [container_port] = _container(job)["ports"]
    assert port["port"] == port["targetPort"] == container_port["containerPort"]
    assert port["port"] == int(_env(job)["WORKER_PORT"]["value"])


def test_the_pods_run_the_trainer_image_through_the_mounted_entrypoint(manifests):
    job, kustomization = manifests["Job"], manifests["Kustomization"]
    container = _container(job)
    assert container["image"] == IMAGE
    assert [image["name"] for image in kustomization["images"]] == [IMAGE]
    [generator] = kustomization["configMapGenerator"]
    assert generator["files"] == ["worker_entrypoint.py"]
    [volume] = job["spec"]["template"]["spec"]["volumes"]
    assert volume["configMap"]["name"] == generator["name"]
    [mount] = container["volumeMounts"]
    assert mount["name"] == volume["name"]
    assert container["command"] == ["python", f"{mount['mountPath']}/worker_entrypoint.py"]
    assert "--strategy" not in container["args"]  # the entry point sets it


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
    pod_env["JOB_NAME"] = job["metadata"]["name"]  # what the job-name label holds
    expected = tuple(
        f"{job['metadata']['name']}-{index}.{pod_env['SERVICE_NAME']}:{pod_env['WORKER_PORT']}"
        for index in range(num_workers)
    )
    entrypoint = _entrypoint()
    for index in range(num_workers):
        text = entrypoint.tf_config(pod_env | {"JOB_COMPLETION_INDEX": str(index)})
        cluster = read_cluster({"TF_CONFIG": text})  # the pipeline's own check accepts it
        assert cluster.addresses == expected
        assert (cluster.task_type, cluster.task_index, cluster.worker_id) == ("worker", index, index)
        assert cluster.is_chief == (index == 0)


def test_the_entrypoint_starts_the_trainer_with_its_tf_config_and_arguments(manifests, tmp_path):
    """Runs the entry point as the pod does; a bad parameter stops the trainer it started at once."""
    env = {name: item["value"] for name, item in _env(manifests["Job"]).items() if "value" in item}
    result = subprocess.run(
        [sys.executable, str(RECIPE / "worker_entrypoint.py"), "--epochs", "0"],
        cwd=tmp_path, env=project_env(**env, JOB_NAME="mnist-train", JOB_COMPLETION_INDEX="1"),
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
    assert container["command"] == ["python", "-m", "mlflow_project", "sweep"]
    env = {item["name"]: item for item in container["env"]}
    assert env["OPTUNA_STORAGE"]["valueFrom"]["secretKeyRef"] == {"name": "optuna-storage", "key": "url"}
    assert {"MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"} <= set(env)
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    assert set(config_map["data"]) == {"MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME"}

    # every pod: the same named study on the Secret's database, and arguments the sweep command accepts
    args = dict(zip(container["args"][::2], container["args"][1::2], strict=True))
    assert args["--study"] and args["--storage"] == "$(OPTUNA_STORAGE)"
    from pipeline.config import parse_parameters
    from pipeline.experiments.study import SearchPlan
    from pipeline.search_space import SWEEP_PARAMETERS

    values = {flag[2:].replace("-", "_"): value for flag, value in args.items()}
    plan = SearchPlan.from_options(parse_parameters(SWEEP_PARAMETERS, values))
    assert (plan.sampler, plan.pruner) == ("tpe", "median") and not plan.space.is_grid
