# The cssl runtime image: the `gpu-pool` Prefect worker pod runs it with its default command
# (`prefect worker start ...`), and every flow-run pod that worker creates runs it with the
# worker's command instead (`prefect flow-run execute`, passed as container args, hence no
# ENTRYPOINT other than tini). Build from the repository root:
#
#   docker build -f infra/worker.Dockerfile \
#     --build-arg GIT_COMMIT="$(git rev-parse HEAD)" -t cssl-worker:0.1.0 .
#
# GPUs: the torch 2.14.1 wheel from PyPI is built against CUDA 13 and pulls the CUDA runtime,
# cuDNN and NCCL in as nvidia-* wheels (pinned in constraints.txt), so the image needs no CUDA
# base image; the GPU node needs an NVIDIA driver that supports CUDA 13 (R580 or newer) and the
# NVIDIA device plugin (or GPU operator), which mounts the driver into the container.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# tini reaps the worker's and the flow's child processes and forwards SIGTERM to them.
RUN apt-get update \
    && apt-get install -y --no-install-recommends tini \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/cssl

# Third-party dependencies first, in their own layer: it is rebuilt only when pyproject.toml or
# the pins change, not on every code change. The list is pyproject's [project] dependencies;
# constraints.txt pins every version to the ones the test suite ran with. prefect-kubernetes
# (the Kubernetes worker) is not a cssl dependency: it and the packages it adds are pinned here
# (`pip install --dry-run -c constraints.txt prefect-kubernetes==0.8.0` resolved them).
COPY pyproject.toml constraints.txt ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt \
        prefect-kubernetes==0.8.0 kopf==1.45.2 kubernetes_asyncio==36.1.0 pyOpenSSL==26.4.0 \
        tenacity==9.2.1 iso8601==2.1.0 \
    && rm /tmp/requirements.txt

# The repository (infra/worker.Dockerfile.dockerignore keeps out .git, .venv, local state and
# data), installed in place: /opt/cssl is the working directory the refresh-gpu deployment's pull
# step sets, so pipelines/refresh.py and params.yaml are read from here.
COPY . .
RUN pip install --no-deps -e .

# An unprivileged user; CSSL_HOME is local scratch (checkpoints, locks): on Kubernetes the pool's
# job template mounts an emptyDir there. Durable state is in S3 and MLflow.
ARG GIT_COMMIT=""
ENV CSSL_HOME=/var/lib/cssl \
    CSSL_GIT_COMMIT=${GIT_COMMIT}
LABEL org.opencontainers.image.title="cssl-worker" \
      org.opencontainers.image.source="infra/worker.Dockerfile" \
      org.opencontainers.image.revision="${GIT_COMMIT}"
RUN useradd --create-home --uid 10001 --user-group cssl \
    && mkdir -p "$CSSL_HOME" \
    && chown cssl:cssl "$CSSL_HOME"
USER 10001

ENTRYPOINT ["/usr/bin/tini", "--"]
CMD ["prefect", "worker", "start", "--pool", "gpu-pool", "--type", "kubernetes"]
