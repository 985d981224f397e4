# The image of the team's servers in infra/k8s: the Prefect server and the MLflow tracking server.
# Both are installed from constraints.txt, so the servers run exactly the prefect and mlflow
# versions of the clients and workers (both projects ask for client and server versions to
# match); psycopg2 is MLflow's Postgres driver (Prefect uses asyncpg, a prefect dependency).
# Build from the repository root:
#
#   docker build -f infra/services.Dockerfile -t cssl-services:0.1.0 .
#
# The command is set by each Kubernetes Deployment (prefect server start / mlflow server).
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

COPY constraints.txt /tmp/constraints.txt
RUN pip install -c /tmp/constraints.txt prefect mlflow boto3 psycopg2-binary==2.9.13 \
    && rm /tmp/constraints.txt

RUN useradd --create-home --uid 10001 --user-group cssl
USER 10001
WORKDIR /home/cssl

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "server", "start", "--host", "0.0.0.0"]
