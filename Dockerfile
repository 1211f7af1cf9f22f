# The hpo image: `hpo worker` and `hpo dashboard` (see docker-compose.yml).
# torch from the package index ships its CUDA libraries; the host needs the NVIDIA driver
# and the NVIDIA Container Toolkit.
FROM python:3.11-slim

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
COPY pyproject.toml README.md ./
COPY hpo ./hpo
RUN pip install .
COPY studies ./studies

# Workers stop on SIGTERM (their running trial is re-queued); run as a plain user.
RUN useradd --create-home hpo && mkdir -p /checkpoints /app/hpo-artifacts \
    && chown hpo /app /checkpoints /app/hpo-artifacts
USER hpo
CMD ["hpo", "--help"]
