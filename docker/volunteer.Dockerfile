# LoRA Commons volunteer: `loracommons join` with an NVIDIA GPU (falls back to CPU).
#
# Build from the repository root (the build context must hold pyproject.toml):
#   docker build -f docker/volunteer.Dockerfile -t loracommons-volunteer .
# Run (your data read-only; your identity persists in a volume; see docker/README.md):
#   docker run --gpus all -v lc-identity:/identity -v "$PWD/my-data:/data:ro" \
#     loracommons-volunteer coordinator.example.org:9092 --data /data/train.jsonl \
#     --identity /identity/id_ecdsa --root-certificates /certs/ca.pem
#
# torch from PyPI is the CUDA build: its wheels bundle the CUDA 13.0 libraries
# (torch 2.13.0 = cu130), so the base only has to match that CUDA major version;
# the host needs an NVIDIA driver for CUDA 13 (580 or newer) and the NVIDIA
# Container Toolkit. Other CUDA builds: --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# with a matching --build-arg CUDA_TAG.

ARG CUDA_TAG=13.0.2-runtime-ubuntu24.04

FROM nvidia/cuda:${CUDA_TAG} AS base

# DL3008 (pin versions in apt-get install) is ignored on purpose: Ubuntu's archive
# drops superseded versions from -updates/-security, so an exact pin stops building
# within weeks. The base image tag fixes the release (24.04), which fixes python3 at 3.12.
# hadolint ignore=DL3008
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates \
 && rm -rf /var/lib/apt/lists/*


FROM base AS build

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://pypi.org/simple
ARG BITSANDBYTES_VERSION=0.50.2

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PATH=/opt/venv/bin:$PATH

RUN python3 -m venv /opt/venv \
 && pip install --no-cache-dir --index-url "$TORCH_INDEX_URL" "torch==${TORCH_VERSION}" \
 && pip install --no-cache-dir "bitsandbytes==${BITSANDBYTES_VERSION}"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY protocol ./protocol
COPY client ./client
COPY coordinator ./coordinator
COPY loracommons ./loracommons
# DL3013 (pin versions in pip install) does not apply: "." is this repository at the
# commit being built; torch and bitsandbytes are pinned above, flwr by the project.
# hadolint ignore=DL3013
RUN pip install --no-cache-dir ".[train]"


FROM base

LABEL org.opencontainers.image.title="loracommons-volunteer" \
      org.opencontainers.image.description="LoRA Commons volunteer node: loracommons join, CUDA torch" \
      org.opencontainers.image.licenses="Apache-2.0"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/huggingface \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

COPY --from=build /opt/venv /opt/venv

# A fixed non-root uid/gid: the identity volume created by this image belongs to it.
RUN groupadd --system --gid 10001 lc \
 && useradd --system --uid 10001 --gid lc --home-dir /home/lc --create-home --shell /usr/sbin/nologin lc \
 && mkdir -p /identity /data /cache /certs \
 && chown lc:lc /identity /cache \
 && chmod 0700 /identity

USER 10001:10001
WORKDIR /home/lc

# /identity: your key (created on first start, mode 0600): keep this volume, it is how the
# project credits your work. /data: your training data, mount it read-only (:ro).
# /cache: the Hugging Face cache (base model downloads).
VOLUME ["/identity", "/data", "/cache"]

STOPSIGNAL SIGTERM
ENTRYPOINT ["loracommons", "join"]
CMD ["--help"]
