#!/usr/bin/env bash
# Install real habitat-sim (and habitat-lab / habitat-baselines, the references the parity tests compare against)
# into the active environment when a wheel for this machine lies in ../shared/wheels/; otherwise do nothing, and
# the habitat tests skip with their reason, as on a user's machine without habitat-sim.
#   bash .ci/habitat-install.sh [WHEEL_DIR]
set -euo pipefail
cd "$(dirname "$0")/.."
wheel_dir=${1:-../shared/wheels}
wheel=$(ls "$wheel_dir"/habitat_sim-0.3.3-*.whl 2>/dev/null | head -n 1 || true)
if [ -z "$wheel" ]; then
  echo "habitat-install: no habitat-sim 0.3.3 wheel in $wheel_dir: the habitat tests will skip"
  exit 0
fi
# the wheel's runtime libraries (its README); libegl-mesa0 + libgl1-mesa-dri: EGL's software renderer (llvmpipe)
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libassimp5 libdraco7 libegl1 libglvnd0 libminizip1 \
  libopengl0 libzstd1 libegl-mesa0 libgl1-mesa-dri >/dev/null
# one resolver run with the torch pin: left alone, habitat-baselines would pull a CUDA build of torch.
# 0.3.320260507 is the habitat-lab/baselines line that pairs with habitat-sim 0.3.3 and imports on Python 3.11.
pip install -q torch==2.13.0 "$wheel" habitat-lab==0.3.320260507 habitat-baselines==0.3.320260507
python -c "import habitat_sim; print('habitat-install: habitat-sim', habitat_sim.__version__)"
