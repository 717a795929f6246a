# ddppo with habitat-sim (headless, with Bullet) for cloud GPUs.
#   docker build -t ddppo .
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/runs" ddppo \
#       train --config configs/pointnav/habitat_gibson_depth.yaml
# data/ holds habitat's layout (datasets/pointnav/..., scene_datasets/...); the configs' relative paths data/ and
# runs/ lead to the two volumes.
# habitat-sim only comes from conda (aihabitat channel), pinned to the version CI tests (TESTED_HABITAT_SIM in
# ddppo/sim/habitat_backend.py); torch comes from the CUDA wheels matching the base image.
FROM nvidia/cuda:12.4.1-cudnn-runtime-ubuntu22.04

ENV DEBIAN_FRONTEND=noninteractive \
    CONDA_DIR=/opt/conda \
    PYTHONUNBUFFERED=1
SHELL ["/bin/bash", "-o", "pipefail", "-c"]

# EGL/GL libraries for headless habitat-sim rendering; versions follow the pinned base image
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl bzip2 libegl1 libgl1 libglib2.0-0 \
    && rm -rf /var/lib/apt/lists/*

RUN curl -fsSL -o /tmp/miniforge.sh \
        https://github.com/conda-forge/miniforge/releases/download/24.11.3-0/Miniforge3-24.11.3-0-Linux-x86_64.sh \
    && bash /tmp/miniforge.sh -b -p "$CONDA_DIR" \
    && rm /tmp/miniforge.sh \
    && "$CONDA_DIR/bin/conda" create -y -n ddppo -c aihabitat -c conda-forge python=3.10 habitat-sim=0.3.3 \
        withbullet headless \
    && "$CONDA_DIR/bin/conda" clean -afy

ENV PATH=/opt/conda/envs/ddppo/bin:$PATH

WORKDIR /opt/ddppo
COPY setup.cfg pyproject.toml README.md ./
COPY ddppo ./ddppo
COPY configs ./configs
COPY slurm ./slurm
RUN pip install --no-cache-dir torch==2.5.1 --index-url https://download.pytorch.org/whl/cu124 \
    && pip install --no-cache-dir -e .

RUN useradd --create-home --uid 1000 ddppo && mkdir -p /data /runs && chown ddppo:ddppo /data /runs \
    && ln -s /data /opt/ddppo/data && ln -s /runs /opt/ddppo/runs
USER 1000:1000
VOLUME ["/data", "/runs"]
ENTRYPOINT ["ddppo"]
CMD ["--help"]
