# A small MLflow tracking server image: MLflow plus the PostgreSQL driver and the S3 client.
#   docker build -f infra/mlflow.Dockerfile -t langops-mlflow:3.17.2 infra
# Keep MLFLOW_VERSION equal to the client's (pyproject.toml pins mlflow>=3.1,<4; CI runs 3.17.2).
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}

ARG MLFLOW_VERSION=3.17.2
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

RUN pip install "mlflow==${MLFLOW_VERSION}" "psycopg2-binary>=2.9" "boto3>=1.34" \
    && useradd --create-home --uid 10001 mlflow
USER mlflow

EXPOSE 5000
CMD ["mlflow", "server", "--help"]
