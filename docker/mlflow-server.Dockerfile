# The team tracking server's image: MLflow at the project's version with basic-auth, the PostgreSQL
# driver and boto3 (the S3 artifact store). It runs the same start script as the native launcher
# (`python -m mlflow_project server`, the tests), and the one-shot jobs of docker-compose.yml (the
# bucket, the studies' database).
FROM python:3.11.13-slim-bookworm

# The project's MLflow version: tests/test_compose.py checks that it is the version the tests run
# and that pyproject.toml admits it.
ARG MLFLOW_VERSION=3.17.2
RUN pip install --no-cache-dir \
        "mlflow[auth]==${MLFLOW_VERSION}" \
        "psycopg2-binary==2.9.13" \
        "boto3==1.44.8"

# The server's app, `proxied-basic-auth` (pipeline/tracking/server_app.py): this project's package without its
# dependencies, for its `mlflow.app` entry point; nothing else of it runs here.
COPY pyproject.toml README.md /opt/mnist-pipeline/
COPY pipeline /opt/mnist-pipeline/pipeline
RUN pip install --no-cache-dir --no-deps /opt/mnist-pipeline

COPY --chmod=0755 docker/start-mlflow-server.sh /usr/local/bin/start-mlflow-server
COPY --chmod=0755 docker/create-bucket.py /usr/local/bin/create-bucket
COPY --chmod=0755 docker/create-study-database.py /usr/local/bin/create-study-database
# Beside the start script, which runs it by that name (as it does natively, from docker/).
COPY --chmod=0755 docker/create-accounts.py /usr/local/bin/create-accounts.py

RUN useradd --system --create-home --uid 10001 mlflow
USER mlflow
WORKDIR /home/mlflow

ENV MLFLOW_HOST=0.0.0.0 \
    MLFLOW_PORT=5000
EXPOSE 5000
ENTRYPOINT ["start-mlflow-server"]
