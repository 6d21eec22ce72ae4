# LoRA Commons coordinator: Flower SuperLink (volunteers connect here), round loop,
# HTTP API and dashboard. CPU only: the coordinator aggregates, it does not train.
#
# Build from the repository root (the build context must hold pyproject.toml):
#   docker build -f docker/coordinator.Dockerfile -t loracommons-coordinator .
# Run (creates the project in the volume on first start, see docker/README.md):
#   docker run -v lc-project:/project -p 9092:9092 -p 8000:8000 \
#     -e LC_BASE_MODEL=loracommons/demo-tiny -e LC_INSECURE=1 loracommons-coordinator

FROM python:3.12-slim-bookworm AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

# The CPU build of torch first, from PyTorch's CPU index (the default wheel on PyPI
# is the CUDA build, gigabytes the coordinator never uses).
RUN python -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY client ./client
COPY coordinator ./coordinator
COPY loracommons ./loracommons
# DL3013 (pin versions in pip install) does not apply: "." is this repository at the
# commit being built; torch is pinned above and the project pins flwr itself.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]"


FROM python:3.12-slim-bookworm

LABEL org.opencontainers.image.title="loracommons-coordinator" \
      org.opencontainers.image.description="LoRA Commons coordinator: SuperLink, round loop, HTTP API" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    LC_PROJECT_DIR=/project \
    LC_HOST=0.0.0.0 \
    LC_FLEET_PORT=9092 \
    LC_HTTP_HOST=0.0.0.0 \
    LC_HTTP_PORT=8000 \
    LC_TLS_DIR=/certs

COPY --from=build /opt/venv /opt/venv
COPY docker/coordinator-entrypoint.sh docker/demo-data.sh /usr/local/bin/

# A fixed non-root uid/gid: volumes created by this image belong to it.
RUN groupadd --system --gid 10001 lc \
 && useradd --system --uid 10001 --gid lc --home-dir /home/lc --create-home --shell /usr/sbin/nologin lc \
 && mkdir -p /project /cache /certs \
 && chown lc:lc /project /cache

USER 10001:10001
WORKDIR /home/lc

# project.toml, keys, SQLite state, releases; the Hugging Face cache (base model).
VOLUME ["/project", "/cache"]

# 9092: Flower SuperLink (Fleet API; Flower 1.42 serves all its APIs on this port).
# 8000: read-only HTTP API and dashboard.
EXPOSE 9092 8000

HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request as u; u.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('LC_HTTP_PORT', '8000'), timeout=4)"]

STOPSIGNAL SIGTERM
# `loracommons coordinator init` on first start (LC_* variables), then
# `exec loracommons coordinator start /project ...`; arguments are passed on to `start`.
ENTRYPOINT ["coordinator-entrypoint.sh"]
CMD []
