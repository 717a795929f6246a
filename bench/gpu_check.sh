#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Performance"): the CUDA tests, the NCCL path, and GPU
# throughput. Everything goes to $OUT (default ./gpu-out); copy the figures into bench/RESULTS.md afterwards.
#   run:  bash bench/gpu_check.sh        (about 6 minutes on an H100; needs torch with CUDA and the package's deps)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export OMP_WAIT_POLICY=PASSIVE
log() { echo "== $*" | tee -a "$OUT/log.txt"; }

# the machine's torch (a CUDA build) stays; the package goes on top of it without touching torch
pip install --no-deps -e . >/dev/null 2>&1 || pip install --no-deps --user -e . >/dev/null 2>&1
python -c "import ddppo" 2>/dev/null || pip install omegaconf numba scikit-fmm gymnasium rich tensorboard imageio >/dev/null 2>&1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

log "CUDA tests (CPU/CUDA simulator agreement, policy on CUDA)"
timeout 240 python -m pytest -q -x tests/test_vector_env.py -k cuda -p no:cacheprovider 2>&1 | tail -5 | tee -a "$OUT/log.txt"

log "simulator throughput on CUDA (depth 64², target >= 100k env-steps/s; RGB-D 128²)"
for n in 256 1024 4096; do
  timeout 120 python -m ddppo bench sim --device cuda --num-envs $n --resolution 64 --sensors depth --steps 200 \
    --data-dir data/pointnav_small > "$OUT/sim_depth64_n$n.json" 2>>"$OUT/log.txt"
done
timeout 120 python -m ddppo bench sim --device cuda --num-envs 1024 --resolution 128 --sensors depth,rgb --steps 100 \
  --data-dir data/pointnav_small > "$OUT/sim_rgbd128_n1024.json" 2>>"$OUT/log.txt"

log "end to end on CUDA, small ResNet at depth 64² (target >= 19,000 frames/s)"
timeout 240 python -m ddppo bench train --updates 6 device=cuda sim.device=cuda sim.resolution=64 \
  policy.encoder=resnet18 policy.base_planes=16 policy.hidden_size=256 ppo.num_envs=256 ppo.num_steps=64 \
  > "$OUT/train_resnet18_depth64.json" 2>>"$OUT/log.txt"

log "NCCL path: torchrun, one rank per GPU, ddppo.backend=nccl"
timeout 180 python -m torch.distributed.run --nproc-per-node="$(nvidia-smi -L | wc -l)" ddppo/train.py \
  --config configs/quickstart.yaml --fresh run_dir="$OUT/runs" name=nccl device=cuda sim.device=cuda \
  ddppo.backend=nccl total_steps=20000 eval_episodes=8 2>&1 | tail -5 | tee -a "$OUT/log.txt"
cp "$OUT/runs/nccl/summary.json" "$OUT/nccl_summary.json" 2>/dev/null
rm -rf "$OUT/runs"
ls -l "$OUT"
