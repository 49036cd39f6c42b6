# The trainer's image: this project and its dependencies, with the MLflow client at the server's
# version. `mlflow run . --env-manager local` runs `python` from PATH: this image's. The compose
# `serve` service runs it too (`mnist-pipeline serve`: the champion behind /invocations).
FROM python:3.11.13-slim-bookworm

# The same version as docker/mlflow-server.Dockerfile (tests/test_compose.py checks both).
ARG MLFLOW_VERSION=3.17.2

RUN useradd --create-home --uid 10001 trainer \
    && mkdir -p /home/trainer/.keras \
    && chown trainer:trainer /home/trainer/.keras
WORKDIR /home/trainer/project
# The dependencies first, from pyproject.toml alone (empty packages stand in for the code): a change
# to the code rebuilds only the last two layers, in seconds, not TensorFlow's.
COPY pyproject.toml ./
RUN mkdir pipeline mlflow_project && touch README.md pipeline/__init__.py mlflow_project/__init__.py \
    && pip install --no-cache-dir . "mlflow[auth]==${MLFLOW_VERSION}" \
    && pip uninstall --yes mnist-mlp-pipeline && rm -rf README.md pipeline mlflow_project build ./*.egg-info
COPY --chown=trainer:trainer . .
RUN pip install --no-cache-dir --no-deps .

USER trainer
# The image has no git: MLflow's GitPython would warn about it on every run.
ENV GIT_PYTHON_REFRESH=quiet
CMD ["mlflow", "run", ".", "--env-manager", "local", "-P", "epochs=20"]
