# The Prefect Kubernetes worker: it only creates Jobs (which run the langops image), so it needs Prefect
# and prefect-kubernetes, not langops. Keep PREFECT_VERSION equal to the server's.
#   docker build -f infra/k8s/worker.Dockerfile -t registry.example.com/langops-prefect-worker:3.8.8 infra/k8s
ARG PYTHON_IMAGE=python:3.11-slim-bookworm
FROM ${PYTHON_IMAGE}
ARG PREFECT_VERSION=3.8.8
ENV PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
RUN pip install "prefect[kubernetes]==${PREFECT_VERSION}" \
    && useradd --create-home --uid 10001 prefect
USER prefect
CMD ["prefect", "worker", "start", "--pool", "langops-kubernetes", "--type", "kubernetes"]
