#!/usr/bin/env bash
# CI: the Docker image built and run for real, without a Docker engine: buildah builds the Dockerfile (chroot
# isolation) on a local Debian 12 base made by debootstrap, with habitat-sim from the shared wheel (HABITAT_SIM=wheel)
# and a CPU build of torch; then, inside the image as its non-root user: `ddppo --help`, a short embedded training and
# its evaluation, and a habitat-sim render of a shared test scene (docker/render_check.py). Prints the image's size and
# the step's time.
#   bash .ci/docker-image.sh [WHEEL_DIR [SCENE_DIR]]      (as root; defaults ../shared/wheels, ../shared/habitat/...)
# Environment (optional): DDPPO_DOCKER_CA_BUNDLE  CA bundle handed to the build as a secret (default: the system's,
#   /etc/ssl/certs/ca-certificates.crt; pip and git inside the build use it); DDPPO_DOCKER_FRESH=1  debootstrap the
#   base again although a local one exists (a fresh CI machine has none; a rerun on the same machine reuses it).
# The image itself is built from scratch every time: buildah 1.28's layer cache (--layers) is wrong for RUN
# --mount=from=<stage> (a cached stage's mount can be missing, and a changed wheel does not invalidate the layer).
set -euo pipefail
cd "$(dirname "$0")/.."
step_start=$SECONDS
wheel_dir=${1:-../shared/wheels}
scene_dir=$(cd "${2:-../shared/habitat/test_scenes}" && pwd)
base=localhost/ddppo-ci-base:bookworm
image=localhost/ddppo:ci
ca_bundle=${DDPPO_DOCKER_CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
log() { while IFS= read -r line; do printf '  |%4ds| %s\n' "$((SECONDS - step_start))" "$line"; done; }
say() { printf '[docker-image %4ds] %s\n' "$((SECONDS - step_start))" "$*"; }

work=$(mktemp -d "${TMPDIR:-/tmp}/ddppo-docker-ci.XXXXXX")
ctr=
placed=()
cleanup() {
  if [ -n "$ctr" ]; then buildah rm "$ctr" >/dev/null || true; fi
  if [ "${#placed[@]}" -gt 0 ]; then rm -f "${placed[@]}"; fi
  rm -rf "$work"
}
trap cleanup EXIT

# 1. tools: buildah (build and run without a daemon), debootstrap (the base image)
if ! command -v buildah >/dev/null || ! command -v debootstrap >/dev/null; then
  say "apt: buildah debootstrap"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq buildah debootstrap >/dev/null
fi
say "$(buildah --version)"

# 2. the base: a minimal Debian 12 made here, imported as a local image (no registry is reachable)
fresh=${DDPPO_DOCKER_FRESH:-0}
if [ "$fresh" != 1 ] && buildah inspect --type image "$base" >/dev/null 2>&1; then
  say "base: $base exists (DDPPO_DOCKER_FRESH=1 makes it again)"
else
  say "base: debootstrap --variant=minbase bookworm"
  debootstrap --variant=minbase bookworm "$work/rootfs" http://deb.debian.org/debian >"$work/debootstrap.log" 2>&1 \
    || { tail -n 30 "$work/debootstrap.log" >&2; exit 1; }
  bctr=$(buildah from scratch)
  buildah copy --quiet "$bctr" "$work/rootfs/" / >/dev/null
  buildah config --env LANG=C.UTF-8 --cmd /bin/bash "$bctr"
  buildah commit --quiet --rm "$bctr" "$base" >/dev/null
  rm -rf "$work/rootfs"
  say "base: $base committed"
fi

# 3. the build context's wheels (gitignored): habitat-sim 0.3.3 and the CPU torch wheel this machine's pip finds for
# CI's pin, so the image does not pull PyPI's CUDA build (several GB)
hsim=$(find "$wheel_dir" -maxdepth 1 -name "habitat_sim-0.3.3-*.whl" -print -quit 2>/dev/null || true)
[ -n "$hsim" ] || { echo "docker-image: no habitat-sim 0.3.3 wheel in $wheel_dir" >&2; exit 1; }
cp "$hsim" docker/wheels/
placed+=("docker/wheels/$(basename "$hsim")")
python3 -m pip download -q --no-deps --dest "$work/torch" torch==2.13.0
torch_wheel=$(find "$work/torch" -name "torch-*.whl" -print -quit)
case "$(basename "$torch_wheel")" in
  *+cpu-*) ;;
  *) echo "docker-image: pip found $(basename "$torch_wheel") for torch==2.13.0, not a CPU build" >&2; exit 1 ;;
esac
torch_version=$(basename "$torch_wheel" | cut -d- -f2)
mv "$torch_wheel" docker/wheels/
placed+=("docker/wheels/$(basename "$torch_wheel")")
say "context wheels: $(basename "$hsim") $(basename "$torch_wheel")"

# 4. the image (the wheel route)
secret=()
if [ -s "$ca_bundle" ]; then secret=(--secret "id=ca_bundle,src=$ca_bundle"); fi
say "build: buildah bud HABITAT_SIM=wheel TORCH=torch==$torch_version BASE_IMAGE=$base"
before=$(buildah containers -q)
buildah bud --isolation chroot --format docker --pull-never "${secret[@]}" \
  --build-arg "BASE_IMAGE=$base" --build-arg HABITAT_SIM=wheel --build-arg "TORCH=torch==$torch_version" \
  -t "$image" . 2>&1 | log
# buildah 1.28 leaves the working containers of stages that RUN --mount=from= read; remove those this build made
for c in $(buildah containers -q); do
  case "$before" in *"$c"*) ;; *) buildah rm "$c" >/dev/null ;; esac
done
rm -f "${placed[@]}"
placed=()
say "image: $image $(buildah images --format '{{.Size}}' "$image") ($(buildah inspect --type image \
  --format 'user {{.OCIv1.Config.User}}, entrypoint {{.OCIv1.Config.Entrypoint}}, volumes {{.OCIv1.Config.Volumes}}' \
  "$image"))"

# 5. inside the image, as the image's user (not root), in its working directory /opt/ddppo
ctr=$(buildah from --pull-never "$image")
user=$(buildah inspect --type container --format '{{.OCIv1.Config.User}}' "$ctr")
in_image() { buildah run --isolation chroot --user "$user" -v "$scene_dir:/scenes:ro" "$ctr" -- "$@"; }
uid=$(in_image id -u)
[ "$uid" != 0 ] || { echo "docker-image: the image runs as root" >&2; exit 1; }
say "run (uid $uid): ddppo --help"
in_image ddppo --help | sed -n 1,5p  # sed reads it all: no SIGPIPE under pipefail
say "run: ddppo train (embedded, 2 envs x 8 steps, 64 frames) and ddppo eval of its checkpoint"
in_image ddppo train --config configs/quickstart.yaml name=ci_image task.data_dir=data/ci_image \
  "dataset.scenes={train: 2, val: 2, test: 1}" "dataset.episodes_per_scene={train: 10, val: 5, test: 5}" \
  dataset.min_extent=5 dataset.max_extent=8 task.max_episode_steps=100 sim.resolution=16 policy.base_planes=8 \
  policy.hidden_size=32 ppo.num_envs=2 ppo.num_steps=8 ppo.num_mini_batch=1 total_steps=64 eval_episodes=0 \
  device=cpu 2>&1 | log
in_image ddppo eval runs/ci_image --split val --episodes 5 --num-envs 2 2>&1 | log
in_image test -s runs/ci_image/eval/val/summary.json
say "run: habitat-sim render of $scene_dir/simple_room.glb (docker/render_check.py)"
in_image python docker/render_check.py /scenes/simple_room.glb 2>&1 | grep -E '^render_check' | log
say "done: docker CI step took $((SECONDS - step_start)) s; image $image $(buildah images --format '{{.Size}}' "$image")"
