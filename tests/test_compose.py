"""docker-compose.yml, its Dockerfiles and .env.example, checked statically (there is no Docker engine
here): the services and the order they start in, healthchecks, pinned images, 127.0.0.1 binds, no
literal secrets, every variable documented, and the same start script as the native launcher."""

from __future__ import annotations

import re
import tomllib
from importlib import metadata

import pytest
import yaml
from packaging.requirements import Requirement

from pipeline.tracking.server import SERVER_SCRIPT, TrackingServer
from tests.helpers import PROJECT_DIR

COMPOSE = yaml.safe_load((PROJECT_DIR / "docker-compose.yml").read_text())
SERVICES = COMPOSE["services"]
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?message}, ${NAME?message}; $$ escapes a $.
VARIABLE = re.compile(r"(?<!\$)\$\{(\w+)(?:(:?[-?])([^}]*))?\}")
SECRETS = {"POSTGRES_PASSWORD", "S3_ACCESS_KEY", "S3_SECRET_KEY", "MLFLOW_ADMIN_PASSWORD", "MLFLOW_FLASK_SECRET_KEY",
           "MLFLOW_TRAINING_PASSWORD", "MLFLOW_SERVING_PASSWORD"}
SECRET_SETTING = re.compile(r"PASSWORD|SECRET|ACCESS_KEY|TOKEN")


class MissingVariable(Exception):
    pass


def interpolate(value: str, environment: dict[str, str]) -> str:
    """What compose makes of `value` with these variables (the subset of its syntax the file uses)."""

    def replace(match: re.Match) -> str:
        name, operator, argument = match.groups()
        given = environment.get(name)
        present = bool(given) if operator and operator.startswith(":") else given is not None
        if present:
            return given
        if operator and operator.endswith("?"):
            raise MissingVariable(f"{name}: {argument}")
        return argument if operator else ""

    return VARIABLE.sub(replace, value).replace("$$", "$")


def strings(node) -> list[str]:
    if isinstance(node, dict):
        return [text for value in node.values() for text in strings(value)]
    if isinstance(node, list):
        return [text for value in node for text in strings(value)]
    return [str(node)]


def resolved(node, environment: dict[str, str]):
    if isinstance(node, dict):
        return {key: resolved(value, environment) for key, value in node.items()}
    if isinstance(node, list):
        return [resolved(value, environment) for value in node]
    return interpolate(node, environment) if isinstance(node, str) else node


def env_example() -> dict[str, str]:
    lines = (PROJECT_DIR / ".env.example").read_text().splitlines()
    return dict(line.split("=", 1) for line in lines if line.strip() and not line.startswith("#"))


def filled_in() -> dict[str, str]:
    """.env.example with every secret filled in, as a user's .env."""
    return env_example() | {name: f"{name.lower()}-value" for name in SECRETS}


def dockerfile(name: str) -> str:
    return (PROJECT_DIR / "docker" / name).read_text()


def build_dockerfile(service: str) -> str:
    return (PROJECT_DIR / SERVICES[service]["build"]["dockerfile"]).read_text()


def test_services_start_in_order_once_what_they_need_is_healthy():
    assert set(SERVICES) == {"postgres", "objectstore", "create-bucket", "mlflow", "proxy", "trainer", "serve",
                             "cluster-worker", "cluster-sweep", "create-study-database"}
    assert SERVICES["proxy"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert SERVICES["mlflow"]["depends_on"] == {
        "postgres": {"condition": "service_healthy"},
        "objectstore": {"condition": "service_healthy"},
        "create-bucket": {"condition": "service_completed_successfully"},
    }
    assert SERVICES["create-bucket"]["depends_on"] == {"objectstore": {"condition": "service_healthy"}}
    assert SERVICES["create-bucket"]["restart"] == "no"
    assert SERVICES["trainer"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert SERVICES["trainer"]["profiles"] == ["train"]
    assert SERVICES["serve"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert SERVICES["serve"]["profiles"] == ["serve"]
    # the serve service runs the trainer's image: no other base image to build and patch
    assert SERVICES["serve"]["image"] == SERVICES["trainer"]["image"]
    assert SERVICES["serve"]["build"] == SERVICES["trainer"]["build"]
    # the cluster's containers (make cluster-train / cluster-sweep) too; a sweep waits for its study database
    for service in ("cluster-worker", "cluster-sweep", "create-study-database"):
        assert SERVICES[service]["profiles"] == ["cluster"]
    for service in ("cluster-worker", "cluster-sweep"):
        assert (SERVICES[service]["image"], SERVICES[service]["build"]) == (SERVICES["trainer"]["image"],
                                                                           SERVICES["trainer"]["build"])
    assert SERVICES["cluster-worker"]["depends_on"] == {"mlflow": {"condition": "service_healthy"}}
    assert SERVICES["cluster-sweep"]["depends_on"] == {
        "mlflow": {"condition": "service_healthy"},
        "create-study-database": {"condition": "service_completed_successfully"},
    }
    assert SERVICES["create-study-database"]["depends_on"] == {"postgres": {"condition": "service_healthy"}}
    assert SERVICES["create-study-database"]["restart"] == "no"


@pytest.mark.parametrize(
    ("service", "probe"),
    [("postgres", "pg_isready"), ("objectstore", "http://127.0.0.1:8333/status"), ("mlflow", "/health"),
     ("mlflow", "/tmp/mlflow-accounts-ready"), ("proxy", "https://localhost/health"), ("serve", "/ping")],
)
def test_long_running_services_have_a_healthcheck_and_restart(service, probe):
    healthcheck = SERVICES[service]["healthcheck"]
    assert any(probe in part for part in strings(healthcheck["test"]))
    assert {"interval", "timeout", "retries"} <= set(healthcheck)
    assert SERVICES[service]["restart"] == "unless-stopped"


def test_stores_keep_their_data_in_named_volumes():
    assert "postgres-data:/var/lib/postgresql/data" in SERVICES["postgres"]["volumes"]
    assert "objectstore-data:/data" in SERVICES["objectstore"]["volumes"]
    assert {"postgres-data", "objectstore-data"} <= set(COMPOSE["volumes"])


def test_images_and_base_images_are_pinned_versions():
    pinned = re.compile(r"^[\w./-]+:\d+(\.\d+)+(-[\w.-]+)?$")
    # pulled images are pinned; the project's own (built here, named for sharing between services) are not pulled
    images = [service["image"] for service in SERVICES.values() if "image" in service and "build" not in service]
    bases = [
        line.split()[1]
        for name in ("mlflow-server.Dockerfile", "trainer.Dockerfile")
        for line in dockerfile(name).splitlines()
        if line.startswith("FROM ")
    ]
    assert images and bases
    assert all(pinned.match(image) for image in images + bases), images + bases
    assert SERVICES["postgres"]["image"].startswith("postgres:16.")
    assert SERVICES["proxy"]["image"].startswith("caddy:2.")
    assert all("image" in service or "build" in service for service in SERVICES.values())


def test_dockerfiles_pin_the_mlflow_version_the_project_runs():
    installed = metadata.version("mlflow")
    pyproject = tomllib.loads((PROJECT_DIR / "pyproject.toml").read_text())
    [mlflow_range] = [
        Requirement(text) for text in pyproject["project"]["dependencies"] if Requirement(text).name == "mlflow"
    ]
    for name in ("mlflow-server.Dockerfile", "trainer.Dockerfile"):
        [pin] = re.findall(r"^ARG MLFLOW_VERSION=(\S+)$", dockerfile(name), flags=re.MULTILINE)
        assert pin == installed, f"{name} pins MLflow {pin}; the project runs {installed}"
        assert mlflow_range.specifier.contains(pin), f"pyproject.toml's {mlflow_range} excludes {pin}"
        assert '"mlflow[auth]==${MLFLOW_VERSION}"' in dockerfile(name)
    server = dockerfile("mlflow-server.Dockerfile")
    assert re.search(r'"psycopg2-binary==[\d.]+"', server) and re.search(r'"boto3==[\d.]+"', server)


def test_only_the_proxys_https_port_is_published_and_on_localhost_unless_configured():
    published = {name: service["ports"] for name, service in SERVICES.items() if "ports" in service}
    # the MLflow server publishes nothing: the proxy is the only way in from outside the compose network
    assert list(published) == ["proxy", "serve"]
    # the champion is served to this machine only
    [served] = published["serve"]
    assert interpolate(served, {}) == "127.0.0.1:5001:5001"
    assert interpolate(served, {"SERVE_PORT": "6001"}) == "127.0.0.1:6001:5001"
    [port] = published["proxy"]
    assert interpolate(port, {}) == "127.0.0.1:8443:443"
    assert interpolate(port, filled_in()) == "127.0.0.1:8443:443"
    assert interpolate(port, {"MLFLOW_BIND_ADDRESS": "0.0.0.0", "MLFLOW_HTTPS_PORT": "443"}) == "0.0.0.0:443:443"
    assert "expose" not in SERVICES["mlflow"]


def test_secrets_come_only_from_env_and_compose_refuses_to_start_without_them():
    for name, service in SERVICES.items():
        for setting, value in service.get("environment", {}).items():
            if SECRET_SETTING.search(setting) or "://" in str(value) and "@" in str(value):
                required = {m.group(1) for m in VARIABLE.finditer(str(value)) if m.group(2) == ":?"}
                assert required & SECRETS, f"{name}.{setting} must come from a required variable, not a literal"
    required = {m.group(1) for text in strings(COMPOSE) for m in VARIABLE.finditer(text) if m.group(2) == ":?"}
    assert required == SECRETS
    example = env_example()
    assert all(example[name] == "" for name in SECRETS), "no secret value may be committed"
    for name in SECRETS:
        with pytest.raises(MissingVariable, match=f"^{name}: {name} is missing: set it in .env"):
            resolved(COMPOSE, filled_in() | {name: ""})
    resolved(COMPOSE, filled_in())  # with every secret set, everything resolves
    assert ".env" in (PROJECT_DIR / ".gitignore").read_text().split()
    assert ".env" in (PROJECT_DIR / ".dockerignore").read_text().split()


def test_env_example_documents_exactly_the_variables_compose_uses():
    used = {m.group(1) for text in strings(COMPOSE) for m in VARIABLE.finditer(text)}
    # but the two that docker/cluster.sh sets for each container it starts
    assert used - {"WORKER_INDEX", "WORKERS"} == set(env_example())


def test_mlflow_service_runs_the_start_script_of_the_native_launcher():
    server_dockerfile = build_dockerfile("mlflow")
    copies = dict(re.findall(r"^COPY (?:--chmod=\d+ )?(\S+) (\S+)$", server_dockerfile, flags=re.MULTILINE))
    script = str(SERVER_SCRIPT.relative_to(PROJECT_DIR))
    assert script == "docker/start-mlflow-server.sh"
    assert copies[script].rsplit("/", 1)[1] == SERVICES["mlflow"]["entrypoint"][0]
    assert 'ENTRYPOINT ["start-mlflow-server"]' in server_dockerfile
    assert copies["docker/create-bucket.py"].rsplit("/", 1)[1] == SERVICES["create-bucket"]["entrypoint"][0]
    assert SERVICES["create-bucket"]["build"] == SERVICES["mlflow"]["build"]


def test_mlflow_service_and_launcher_give_the_script_every_setting_it_requires(tmp_path):
    required = set(re.findall(r'^: "\$\{(\w+):\?', SERVER_SCRIPT.read_text(), flags=re.MULTILINE))
    assert required == {
        "MLFLOW_BACKEND_STORE_URI", "MLFLOW_ARTIFACTS_DESTINATION", "MLFLOW_AUTH_ADMIN_USERNAME",
        "MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY",
    }
    service = resolved(SERVICES["mlflow"]["environment"], filled_in())
    launcher = TrackingServer(tmp_path, port=5000).server_environment()
    for settings in (service, launcher):
        assert required <= {name for name, value in settings.items() if value}
        assert {"MLFLOW_HOST", "MLFLOW_PORT", "MLFLOW_WORKERS"} <= set(settings)
    assert (service["MLFLOW_HOST"], str(service["MLFLOW_PORT"])) == ("0.0.0.0", "5000")


def test_mlflow_service_proxies_artifacts_to_the_bucket_the_job_creates():
    service = resolved(SERVICES["mlflow"]["environment"], filled_in())
    bucket_job = resolved(SERVICES["create-bucket"]["environment"], filled_in())
    assert service["MLFLOW_ARTIFACTS_DESTINATION"] == f"s3://{bucket_job['S3_BUCKET']}/"
    store_port = re.search(r"-s3\.port=(\d+)", " ".join(SERVICES["objectstore"]["command"])).group(1)
    assert service["MLFLOW_S3_ENDPOINT_URL"] == bucket_job["MLFLOW_S3_ENDPOINT_URL"] == f"http://objectstore:{store_port}"
    assert service["MLFLOW_BOTO_CLIENT_ADDRESSING_STYLE"] == "path"  # the store knows no bucket host names
    keys = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
    store = resolved(SERVICES["objectstore"]["environment"], filled_in())
    assert [service[key] for key in keys] == [bucket_job[key] for key in keys] == [store[key] for key in keys]
    example = filled_in()
    assert service["MLFLOW_BACKEND_STORE_URI"] == (
        f"postgresql+psycopg2://{example['POSTGRES_USER']}:{example['POSTGRES_PASSWORD']}"
        f"@postgres:5432/{example['POSTGRES_DB']}"
    )


def test_trainer_runs_the_project_against_the_mlflow_service_with_the_training_account():
    trainer = resolved(SERVICES["trainer"], filled_in())
    assert trainer["command"][:5] == ["mlflow", "run", ".", "--env-manager", "local"]
    assert "epochs=20" in trainer["command"]
    assert resolved(SERVICES["trainer"]["command"], {"EPOCHS": "3"})[6] == "epochs=3"
    environment = trainer["environment"]
    assert environment["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert environment["MLFLOW_TRACKING_USERNAME"] == filled_in()["MLFLOW_TRAINING_USERNAME"]
    assert environment["MLFLOW_TRACKING_PASSWORD"] == filled_in()["MLFLOW_TRAINING_PASSWORD"]
    # the server accepts the Host header the trainer sends
    allowed = resolved(SERVICES["mlflow"]["environment"], filled_in())["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert "mlflow:*" in allowed


def test_each_job_signs_in_with_its_own_account_and_only_the_server_holds_the_admin_password():
    settings = filled_in()
    server = resolved(SERVICES["mlflow"]["environment"], settings)
    serve = resolved(SERVICES["serve"]["environment"], settings)
    assert (serve["MLFLOW_TRACKING_USERNAME"], serve["MLFLOW_TRACKING_PASSWORD"]) == (
        settings["MLFLOW_SERVING_USERNAME"], settings["MLFLOW_SERVING_PASSWORD"])
    # the server creates both accounts, and serves the model the serve service asks for
    assert (server["MLFLOW_TRAINING_USERNAME"], server["MLFLOW_TRAINING_PASSWORD"]) == (
        settings["MLFLOW_TRAINING_USERNAME"], settings["MLFLOW_TRAINING_PASSWORD"])
    assert (server["MLFLOW_SERVING_USERNAME"], server["MLFLOW_SERVING_PASSWORD"]) == (
        settings["MLFLOW_SERVING_USERNAME"], settings["MLFLOW_SERVING_PASSWORD"])
    served = resolved(SERVICES["serve"]["command"], settings)
    assert server["MLFLOW_SERVED_MODEL"] == served[served.index("--model-name") + 1]
    assert server["MLFLOW_TRAINING_EXPERIMENT"] == resolved(SERVICES["trainer"]["environment"], settings)[
        "MLFLOW_EXPERIMENT_NAME"]
    # no service but the server gets the admin password, by any name
    holders = {name for name, service in SERVICES.items()
               if any(settings["MLFLOW_ADMIN_PASSWORD"] in str(value)
                      for value in resolved(service.get("environment", {}), settings).values())}
    assert holders == {"mlflow"}
    assert settings["MLFLOW_DEFAULT_PERMISSION"] == "NO_PERMISSIONS" == server["MLFLOW_AUTH_DEFAULT_PERMISSION"]


def test_the_proxy_terminates_tls_for_the_mlflow_service_with_a_pinned_caddy():
    proxy = resolved(SERVICES["proxy"], filled_in())
    caddyfile = (PROJECT_DIR / "docker" / "caddy" / "Caddyfile").read_text()
    assert "./docker/caddy:/etc/caddy:ro" in proxy["volumes"]
    assert "reverse_proxy mlflow:5000" in caddyfile
    assert re.search(r"^\{\$MLFLOW_TLS_NAMES:localhost 127\.0\.0\.1\} \{$", caddyfile, re.MULTILINE)
    assert "import /etc/caddy/tls-{$MLFLOW_TLS:internal}.caddy" in caddyfile
    # each MLFLOW_TLS value .env.example names has its file, with the certificate it says
    assert {path.name for path in (PROJECT_DIR / "docker" / "caddy").glob("tls-*.caddy")} == {
        "tls-internal.caddy", "tls-files.caddy"}
    assert "tls internal" in (PROJECT_DIR / "docker" / "caddy" / "tls-internal.caddy").read_text()
    assert "tls /certificates/cert.pem /certificates/key.pem" in (
        PROJECT_DIR / "docker" / "caddy" / "tls-files.caddy").read_text()
    assert f"{filled_in()['MLFLOW_TLS_CERT_DIR']}:/certificates:ro" in proxy["volumes"]
    assert proxy["environment"]["MLFLOW_TLS"] == filled_in()["MLFLOW_TLS"] == "internal"
    # the links the trainer prints are the proxy's https address
    assert filled_in()["MLFLOW_UI_URL"] == f"https://127.0.0.1:{filled_in()['MLFLOW_HTTPS_PORT']}"
