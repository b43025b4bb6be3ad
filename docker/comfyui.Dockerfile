# Optional: ComfyUI with the Luna Stack node pack, a thin client of the clip / vae / unet services.
# Same base and torch as docker/Dockerfile (see there why the CUDA "base" flavour is enough). ComfyUI
# keeps its own GPU: samplers run here, and the services hand results over by CUDA IPC on a shared GPU.
FROM nvidia/cuda:12.6.3-base-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCHVISION_VERSION=0.28.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu126
ARG COMFYUI_VERSION=v0.3.54

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1

# DL3008: see docker/Dockerfile (the base tag pins the release; apt versions rotate out of the archive).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# torchaudio is left to the resolver: it must match torch, which the constraint pins.
RUN echo "torch==${TORCH_VERSION}" > /opt/constraints.txt \
    && echo "torchvision==${TORCHVISION_VERSION}" >> /opt/constraints.txt \
    && pip install torch torchvision torchaudio -c /opt/constraints.txt --index-url "${TORCH_INDEX_URL}"

# ComfyUI at a pinned release, and its requirements (torch stays the CUDA build installed above).
ADD https://github.com/comfyanonymous/ComfyUI/archive/refs/tags/${COMFYUI_VERSION}.tar.gz /tmp/comfyui.tar.gz
WORKDIR /opt/comfyui
RUN tar -xzf /tmp/comfyui.tar.gz --strip-components=1 \
    && rm /tmp/comfyui.tar.gz \
    && pip install -r requirements.txt -c /opt/constraints.txt

# The luna-stack client (base install, no [server] extras), then the node pack as a custom node.
COPY pyproject.toml /opt/luna/
COPY services/ /opt/luna/services/
RUN pip install /opt/luna -c /opt/constraints.txt && rm -rf /opt/luna
COPY comfy_nodes/ custom_nodes/luna_stack_nodes/
COPY docker/comfyui-extra-model-paths.yaml extra_model_paths.yaml

# ComfyUI writes outputs, uploads, temp files and user settings under its own tree.
RUN groupadd --system --gid 10001 comfy \
    && useradd --system --uid 10001 --gid 10001 --create-home --shell /usr/sbin/nologin comfy \
    && mkdir -p output input temp user \
    && chown -R 10001:10001 output input temp user custom_nodes
USER 10001:10001

EXPOSE 8188
HEALTHCHECK --interval=15s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import urllib.request as u; u.urlopen('http://127.0.0.1:8188/system_stats', timeout=4)"]
CMD ["python", "main.py", "--listen", "0.0.0.0", "--port", "8188"]
