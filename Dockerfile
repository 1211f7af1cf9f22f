# The hpo image: `hpo worker`, `hpo create`, `hpo report` and `hpo dashboard` (see
# docker-compose.yml and deploy/k8s). Reproducible: the Python release and every package
# version are pinned (deploy/requirements.lock: the environment the tests ran), so two
# builds a week apart install the same versions. torch from the package index ships its
# CUDA libraries; the host needs the NVIDIA driver and the NVIDIA Container Toolkit.
#   docker build -t hpo:0.1.0 .
FROM python:3.11.7-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Every dependency, exactly pinned; --no-deps: nothing outside the lock is installed.
COPY deploy/requirements.lock ./
RUN pip install --no-deps -r requirements.lock
# hpo itself, built with a pinned build backend instead of whatever the index has today.
COPY pyproject.toml README.md ./
COPY hpo ./hpo
RUN pip install --no-deps hatchling==1.33.0 pathspec==1.1.1 pluggy==1.7.0 \
        trove-classifiers==2026.9.21.13 tomlkit==0.15.3 \
    && pip install --no-deps --no-build-isolation . \
    && pip uninstall --yes hatchling pathspec pluggy trove-classifiers tomlkit
COPY studies ./studies

# Workers stop on SIGTERM (their running trial is re-queued). A plain user with a fixed
# UID (deploy/k8s runs the pods as 10001 and gives the volumes that group).
RUN groupadd --gid 10001 hpo && useradd --uid 10001 --gid 10001 --create-home hpo \
    && mkdir -p /checkpoints /artifacts /data /app/hpo-artifacts /app/.hpo-cache \
    && chown hpo:hpo /app /checkpoints /artifacts /app/hpo-artifacts /app/.hpo-cache
USER 10001:10001
CMD ["hpo", "--help"]
