"""What do ``policy.encoder_precision=bfloat16`` and the encoders' memory layouts buy on this machine? The policy's
two costs, printed as JSON.

    python bench/precision_probe.py [--repeats 5] [--layouts] [--config F] [key=value ...]

The config's policy is built twice with the same weights, its encoder computing in float32 and in bf16, and both
are timed in this process, alternated ``--repeats`` times (a shared machine's speed drifts from one minute to the
next; alternating puts both under the same drift): ``learn`` is one PPO minibatch's forward and backward
(``evaluate_actions`` over ``ppo.num_steps`` x ``ppo.num_envs / ppo.num_mini_batch`` frames, as the trainer runs it),
``act`` one action of ``ppo.num_envs`` environments. ``<term>_speedup`` = float32 time ÷ bf16 time (medians), so
above 1 means bf16 is faster. Observations are random images of the config's sensors: these are timings, not
learning. No simulator, no optimiser step.

``--layouts`` also times each precision with the encoder forced into the other memory layout than the one it picks
(``ddppo.policy.encoders.base.in_memory_format``: SimpleCNN runs channels-last, the GroupNorm encoders NCHW):
``<term>_ms_<precision>_other_layout``, and ``<term>_layout_gain_<precision>`` = that time ÷ the chosen layout's.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ddppo.policy.encoders.base  # noqa: E402
import ddppo.policy.encoders.small_cnn  # noqa: E402
from ddppo.bench.throughput import machine  # noqa: E402
from ddppo.config import load_config  # noqa: E402
from ddppo.distributed import resolve_device  # noqa: E402
from ddppo.evaluation.trained_policy import policy_spaces  # noqa: E402
from ddppo.policy import Policy  # noqa: E402
from ddppo.policy.precision import has_native_bfloat16  # noqa: E402
from ddppo.trainer.malloc_settings import keep_freed_memory  # noqa: E402

PRECISIONS = ("float32", "bfloat16")


def random_batch(spaces: dict, *lead: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    batch = {}
    for key, (shape, dtype) in spaces.items():
        if dtype == torch.uint8:
            batch[key] = torch.randint(0, 256, (*lead, *shape), dtype=torch.uint8, generator=gen)
        else:
            batch[key] = torch.rand((*lead, *shape), generator=gen)
    return batch


@contextlib.contextmanager
def other_layout():
    """Encoders run in the memory layout they do not pick (channels-last instead of NCHW and vice versa)."""
    chosen = ddppo.policy.encoders.base.in_memory_format

    def swapped(x, memory_format):
        cl = memory_format == torch.channels_last
        return chosen(x, torch.contiguous_format if cl else torch.channels_last)

    modules = (ddppo.policy.encoders.base, ddppo.policy.encoders.small_cnn)
    for module in modules:
        module.in_memory_format = swapped
    try:
        yield
    finally:
        for module in modules:
            module.in_memory_format = chosen


def probe(cfg, repeats: int, layouts: bool = False) -> dict:
    if cfg.keep_freed_memory:  # timed as the trainer runs them
        keep_freed_memory()
    device = resolve_device(cfg.device)
    policies = {}
    for precision in PRECISIONS:
        cfg.policy.encoder_precision = precision
        torch.manual_seed(cfg.seed)
        policies[precision] = Policy(policy_spaces(cfg), cfg.policy).to(device)
    # the observations as the rollout storage keeps them (pooled when policy.avgpool > 1), for acting too
    spaces = policies["float32"].storage_spaces(policy_spaces(cfg))
    gen = torch.Generator().manual_seed(0)
    t_len, n, envs = cfg.ppo.num_steps, cfg.ppo.num_envs // cfg.ppo.num_mini_batch, cfg.ppo.num_envs
    seq = {k: v.to(device) for k, v in random_batch(spaces, t_len, n, gen=gen).items()}
    prev = torch.randint(0, 4, (t_len, n), generator=gen).to(device)
    actions = torch.randint(0, 4, (t_len, n), generator=gen).to(device)
    masks = (torch.rand(t_len, n, generator=gen) > 0.02).float().to(device)  # some episode starts, as in a rollout
    step = {k: v.to(device) for k, v in random_batch(spaces, envs, gen=gen).items()}
    step_prev, step_masks = torch.randint(0, 4, (envs,), generator=gen).to(device), torch.ones(envs, device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def learn(policy):
        policy.train()
        for p in policy.parameters():
            p.grad = None
        log_probs, values, entropy = policy.evaluate_actions(seq, prev, masks, policy.initial_hidden(n), actions)
        (-log_probs.mean() + 0.5 * values.square().mean() - 0.01 * entropy.mean()).backward()

    def act(policy):
        policy.eval()
        with torch.no_grad():
            policy.act(step, step_prev, step_masks, policy.initial_hidden(envs))

    terms = {"learn": (learn, 3), "act": (act, 20)}
    variants = [(p, suffix) for p in PRECISIONS for suffix in ("", "_other_layout")[: 1 + layouts]]
    times: dict[str, list[float]] = {f"{t}_ms_{p}{v}": [] for t in terms for p, v in variants}
    for _ in range(repeats):
        for precision, suffix in variants:
            policy = policies[precision]
            with other_layout() if suffix else contextlib.nullcontext():
                for term, (fn, calls) in terms.items():
                    fn(policy)  # warm-up: kernels chosen, memory reserved
                    sync()
                    t0 = time.perf_counter()
                    for _ in range(calls):
                        fn(policy)
                    sync()
                    times[f"{term}_ms_{precision}{suffix}"].append((time.perf_counter() - t0) / calls * 1e3)
    out: dict = {"bench": "precision_probe", "repeats": repeats}
    for key, values in times.items():
        out[key] = statistics.median(values)
        out[f"{key}_rounds"] = values
    for term in terms:
        out[f"{term}_speedup"] = out[f"{term}_ms_float32"] / out[f"{term}_ms_bfloat16"]
        for precision in PRECISIONS if layouts else ():
            out[f"{term}_layout_gain_{precision}"] = (out[f"{term}_ms_{precision}_other_layout"]
                                                       / out[f"{term}_ms_{precision}"])
    out.update(encoder_precisions=[p.encoder_precision for p in policies.values()],
               native_bfloat16=has_native_bfloat16(device), device=str(device), learn_frames=t_len * n,
               act_envs=envs, encoder=cfg.policy.encoder, resolution=cfg.sim.resolution,
               sensors=list(cfg.sim.sensors), avgpool=cfg.policy.avgpool, threads=torch.get_num_threads(),
               machine=machine())
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/quickstart.yaml")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--layouts", action="store_true", help="also time the encoders in the other memory layout")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error(f"--repeats {args.repeats}: must be at least 1")
    cfg = load_config(args.config, args.overrides)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    out = probe(cfg, args.repeats, args.layouts)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
