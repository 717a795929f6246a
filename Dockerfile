# syntax=docker/dockerfile:1
# ddppo with headless habitat-sim 0.3.3 (EGL; no Bullet, no CUDA inside habitat-sim) and torch, for cloud GPUs and
# SLURM clusters (apptainer). docs/docker.md has the details; README's "Docker" section the short form.
#
#   docker build -t ddppo .                                        # habitat-sim compiled from source (~35 min on 2 cores)
#   docker build --build-arg HABITAT_SIM=wheel -t ddppo .          # from docker/wheels/habitat_sim-0.3.3-*.whl
#   docker run --gpus all -v "$PWD/data:/data" -v "$PWD/runs:/runs" ddppo \
#       train --config configs/pointnav/habitat_gibson_depth.yaml
#
# Build arguments:
#   BASE_IMAGE      the image every stage starts from. Default debian:bookworm-slim, and a GPU image all the same:
#                   PyPI's torch wheels for Linux x86_64 carry their own CUDA runtime (cuDNN, cuBLAS, NCCL as nvidia-*
#                   wheels) and the driver comes from the host through the NVIDIA container toolkit (docker --gpus,
#                   apptainer --nv), so an nvidia/cuda base would only add a second, unused copy of the CUDA libraries
#                   (GBs). Debian 12 is also the system habitat-sim's build recipe and the habitat-sim wheel are made
#                   for (CPython 3.11, libassimp5, libdraco7): an nvidia/cuda base is Ubuntu, with another Python and
#                   other library package names, so the apt lists below would have to change with it. Any Debian 12
#                   derived image works (CI passes a local debootstrapped bookworm).
#   HABITAT_SIM     source (default): stage habitat-sim-source builds it from its public git tag, following
#                   build_habitat_sim.sh (the no-conda route); wheel: docker/wheels/habitat_sim-0.3.3-*.whl of the
#                   build context (CI's route; CPython 3.11, x86_64).
#   HABITAT_SIM_TAG habitat-sim's git tag for the source route (v0.3.3: the release CI tests, TESTED_HABITAT_SIM).
#   BUILD_JOBS      parallel compile jobs of the source route (default: every core).
#   TORCH           torch's requirement (default torch: the newest release within the package's own range, which
#                   PyPI serves as its CUDA build). CI passes torch==2.13.0+cpu, a CPU wheel it puts in docker/wheels/.
#   TORCH_INDEX_URL an extra index for torch (e.g. https://download.pytorch.org/whl/cu128 for one CUDA version);
#                   default none.
# Every wheel in docker/wheels/ of the build context is a candidate for pip (--find-links); nothing there is committed.
# pip and git reach PyPI and GitHub only in the build stages; the image's own install is offline from stage wheelhouse.
# Behind a TLS-intercepting proxy hand the build a full CA bundle as a secret; it is used for pip and git and never
# stored in the image:  --secret id=ca_bundle,src=/etc/ssl/certs/ca-certificates.crt
ARG BASE_IMAGE=debian:bookworm-slim
ARG HABITAT_SIM=source

# --- base: Python 3.11 in a venv and habitat-sim's runtime libraries ------------------------------------------------
FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# libassimp5 ... libzstd1: what the habitat-sim build links (its wheel's README). libegl-mesa0 + libgl1-mesa-dri: EGL's
# software renderer (llvmpipe) for machines without a GPU (sim.gpu_device_id=-1); on a GPU the NVIDIA container toolkit
# adds the driver's EGL vendor file (10_nvidia.json), which glvnd tries before Mesa's (50_mesa.json). Versions follow
# the base image's release.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
        libassimp5 libdraco7 libegl1 libglvnd0 libminizip1 libopengl0 libzstd1 libegl-mesa0 libgl1-mesa-dri \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV"

# --- habitat-sim from source: the commands of build_habitat_sim.sh (stages apt, src, venv, build, pack) -------------
FROM base AS habitat-sim-source
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG HABITAT_SIM_TAG=v0.3.3
ARG BUILD_JOBS=
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential cmake ninja-build git pkg-config python3-dev \
        libassimp-dev libeigen3-dev libzstd-dev libegl-dev libgl-dev libgles-dev libopengl-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /build
# Only the submodules the headless, no-Bullet build needs; Eigen, Assimp and zstd come from Debian, OpenEXR is off.
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export GIT_SSL_CAINFO=/run/secrets/ca_bundle; fi \
    && git clone -q --branch "$HABITAT_SIM_TAG" --depth 1 https://github.com/facebookresearch/habitat-sim.git src \
    && git -C src submodule update --init --jobs 4 src/deps/corrade src/deps/magnum src/deps/magnum-plugins \
        src/deps/magnum-integration src/deps/magnum-bindings src/deps/recastnavigation src/deps/rapidjson \
        src/deps/pybind11
# A build venv with habitat-sim's own requirements, then one bdist_wheel call (a separate build_ext call first would
# compile everything twice), then magnum's Python bindings (habitat_sim imports them; setup.py only installs them into
# its build venv) as a wheel of their own beside habitat-sim's.
WORKDIR /build/src
RUN --mount=type=secret,id=ca_bundle \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && python3 -m venv /build/venv \
    && /build/venv/bin/pip install -q -U pip setuptools wheel \
    && /build/venv/bin/pip install -q -r requirements.txt \
    && PATH=/build/venv/bin:$PATH CMAKE_BUILD_PARALLEL_LEVEL="${BUILD_JOBS:-$(nproc)}" \
        /build/venv/bin/python setup.py bdist_wheel --dist-dir=/wheels \
        --headless --no-bullet --no-lto --build-type=Release --no-update-submodules \
        "--cmake-args=-DUSE_SYSTEM_ASSIMP=ON -DUSE_SYSTEM_EIGEN=ON -DUSE_SYSTEM_ZSTD=ON -DUSE_SYSTEM_OPENEXR=ON" \
    && pymagnum=$(find build -maxdepth 5 -type d -path '*/deps/magnum-bindings/src/python' -print -quit) \
    && test -n "$pymagnum" \
    && /build/venv/bin/pip wheel -q --no-deps --no-build-isolation -w /wheels "$pymagnum" \
    && rm -rf build

# --- habitat-sim from a wheel of the build context ------------------------------------------------------------------
FROM scratch AS habitat-sim-wheel
COPY docker/wheels/habitat_sim-0.3.3-*.whl /wheels/

# the route's stage under one name (a stage, not an image to tag: DL3006 does not apply)
# hadolint ignore=DL3006
FROM habitat-sim-${HABITAT_SIM} AS habitat-sim

# --- wheelhouse: every wheel the image installs, downloaded or built here (scikit-fmm has no binary wheel on PyPI and
# needs a C++ compiler); the image itself installs from it offline and carries no compiler ----------------------------
FROM base AS wheelhouse
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH=torch
ARG TORCH_INDEX_URL=
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ python3-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
# only what the package's metadata needs (its requirements in setup.cfg), so a code change keeps this stage cached
COPY setup.cfg pyproject.toml README.md ./
# One resolver run: torch (TORCH; the package's range either way), habitat-sim's wheels (which pin numpy 1.26.4 and
# pillow 10.4.0), ddppo's requirements, and setuptools/wheel for its editable install.
RUN --mount=type=secret,id=ca_bundle \
    --mount=type=bind,source=docker/wheels,target=/tmp/wheels \
    --mount=type=bind,from=habitat-sim,source=/wheels,target=/tmp/habitat-sim \
    if [ -s /run/secrets/ca_bundle ]; then export PIP_CERT=/run/secrets/ca_bundle; fi \
    && pip wheel -q --wheel-dir /wheelhouse --find-links /tmp/wheels \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} \
        "$TORCH" /tmp/habitat-sim/*.whl . "setuptools>=64" wheel \
    && rm -f /wheelhouse/ddppo-*.whl \
    && ls /wheelhouse

# --- the image: ddppo, torch and habitat-sim in /opt/venv, run as a non-root user ------------------------------------
FROM base AS runtime
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# habitat-sim's EGL looks for the NVIDIA driver only where the container toolkit mounted its graphics libraries: without
# "graphics" here a GPU container gets Mesa's libEGL alone, and habitat-sim fails with "unable to find CUDA device 0
# among N EGL devices".
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility,graphics
# every wheel of the wheelhouse (torch, habitat-sim, ddppo's requirements), offline and from a bind mount, so that no
# wheel stays in a layer; before the code is copied, so that a code change keeps this layer
RUN --mount=type=bind,from=wheelhouse,source=/wheelhouse,target=/tmp/wheelhouse \
    pip install -q --no-index /tmp/wheelhouse/*.whl \
    && python -c "import habitat_sim, torch; print('habitat-sim', habitat_sim.__version__, '| torch', torch.__version__)"
WORKDIR /opt/ddppo
COPY setup.cfg pyproject.toml README.md ./
COPY ddppo ./ddppo
COPY configs ./configs
COPY slurm ./slurm
COPY docker/render_check.py ./docker/render_check.py
# ddppo editable (its default config is configs/quickstart.yaml of this checkout); pip check: its requirements are met
RUN pip install -q --no-index --no-deps --no-build-isolation -e . \
    && pip check \
    && useradd --create-home --uid 1000 --user-group ddppo \
    && mkdir -p /data /runs && chown ddppo:ddppo /data /runs \
    && ln -s /data /opt/ddppo/data && ln -s /runs /opt/ddppo/runs
USER 1000:1000
VOLUME ["/data", "/runs"]
ENTRYPOINT ["ddppo"]
CMD ["--help"]
