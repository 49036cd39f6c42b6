# The trainer's image: this project and its dependencies, with the MLflow client at the server's
# version. `mlflow run . --env-manager local` runs `python` from PATH: this image's.
FROM python:3.11.13-slim-bookworm

# The same version as docker/mlflow-server.Dockerfile (tests/test_compose.py checks both).
ARG MLFLOW_VERSION=3.17.2

RUN useradd --create-home --uid 10001 trainer \
    && mkdir -p /home/trainer/.keras \
    && chown trainer:trainer /home/trainer/.keras
WORKDIR /home/trainer/project
COPY --chown=trainer:trainer . .
RUN pip install --no-cache-dir . "mlflow[auth]==${MLFLOW_VERSION}"

USER trainer
# The image has no git: MLflow's GitPython would warn about it on every run.
ENV GIT_PYTHON_REFRESH=quiet
CMD ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=20"]
