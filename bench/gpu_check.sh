#!/usr/bin/env bash
# One prepared run on a lent GPU machine (see README "Benchmarks"): the CUDA tests, GPU throughput and the NCCL
# path, in about 5 minutes. Everything goes to $OUT (default ./gpu-out); the raw figures then go into bench/LOG.md
# and the current ones into bench/RESULTS.md.
#   run:  bash bench/gpu_check.sh   (torch with CUDA and the package's dependencies already installed; the dataset
#         data/pointnav_small with its stored geodesic fields, so no FMM is needed there)
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
log() { echo "== $*" | tee -a "$OUT/log.txt"; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name())" \
  | tee -a "$OUT/gpu.txt"

log "CUDA tests (the simulator on CPU and CUDA agree step by step)"
timeout 90 python -m pytest -q -x tests/test_vector_env.py -k cuda -p no:cacheprovider 2>&1 | tail -3 | tee -a "$OUT/log.txt"

log "simulator throughput on CUDA (depth 64², target >= 100k env-steps/s; RGB-D 128²)"
for n in 1024 4096; do
  timeout 45 python -m ddppo bench sim --device cuda --num-envs $n --resolution 64 --sensors depth --steps 100 \
    --warmup 50 --data-dir data/pointnav_small > "$OUT/sim_depth64_n$n.json" 2>>"$OUT/log.txt"
done
timeout 45 python -m ddppo bench sim --device cuda --num-envs 1024 --resolution 128 --sensors depth,rgb --steps 50 \
  --warmup 20 --data-dir data/pointnav_small > "$OUT/sim_rgbd128_n1024.json" 2>>"$OUT/log.txt"

log "end to end on CUDA, small ResNet at depth 64² (target >= 19,000 frames/s), float32 and bf16 encoder"
for p in float32 bfloat16; do
  timeout 150 python -m ddppo bench train --updates 3 device=cuda sim.device=cuda sim.resolution=64 \
    policy.encoder=resnet18 policy.base_planes=16 policy.hidden_size=256 ppo.num_envs=256 ppo.num_steps=64 \
    policy.encoder_precision=$p > "$OUT/train_resnet18_depth64_$p.json" 2>>"$OUT/log.txt"
done

log "NCCL path: torchrun, one rank per GPU, ddppo.backend=nccl"
timeout 60 python -m torch.distributed.run --nproc-per-node="$(nvidia-smi -L | wc -l)" ddppo/train.py \
  --config configs/quickstart.yaml --fresh run_dir="$OUT/runs" name=nccl device=cuda sim.device=cuda \
  ddppo.backend=nccl total_steps=8192 eval_episodes=8 2>&1 | tail -3 | tee -a "$OUT/log.txt"
cp "$OUT/runs/nccl/summary.json" "$OUT/nccl_summary.json" 2>/dev/null
rm -rf "$OUT/runs"
for f in "$OUT"/*.json; do echo "$f: $(grep -o '"env_steps_per_s": [0-9.]*' "$f" | head -1)"; done | tee -a "$OUT/log.txt"
