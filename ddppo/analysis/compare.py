"""``ddppo compare-reps CKPT_A CKPT_B``: how alike are two agents' visual representations, layer by layer.

Both encoders see one fixed probe set: observations from the **val** scenes of checkpoint A's dataset, rendered by
the embedded simulator along seeded random walks (``probe_observations``), so the same command gives the same
numbers. Activations come from every stage of the encoder (``encoder.stages``: stem, residual / fire stages and
the compression conv of a StagedEncoder; the three convs of SimpleCNN) and from ``visual_fc``, the vector the
recurrent core reads. Conv maps are average-pooled over space (one datapoint per image) by default; with
``--conv positions`` every (image, position) is a datapoint (a seeded subset of positions, the same for both
networks) and only layers with the same map size are paired.

For every layer pair: symmetric PWCCA (the mean of the A-weighted and B-weighted scores of one CCA,
ddppo.analysis.similarity) and linear CKA, in float64. Similarity values mean little alone (docs/design.md,
"Representation similarity"), so every layer is also compared with the same layer of a **randomly initialised**
network of A's (and B's) architecture,
and, with ``--baseline CKPT_C`` (e.g. the same task trained with another seed), with that network. CCA needs
several datapoints per neuron: a pair with fewer than ``min_ratio`` (5) is refused with a one-line error.

Output: ``<out>/compare_reps.json``, a printed table, and ``<out>/compare_reps.png`` (heatmaps of A x B, bars of
the per-layer comparisons with the baselines).
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from ddppo.analysis.similarity import check_datapoints, linear_cka, pwcca
from ddppo.config import TrainConfig
from ddppo.evaluation.trained_policy import policy_from_checkpoint, policy_spaces
from ddppo.io.atomic import atomic_write_text
from ddppo.policy import Policy
from ddppo.sim.dataset_dir import ensure_dataset
from ddppo.sim.environments import make_vector_env

DEFAULT_PROBE = 3000
STRIDE = 4
"""Random-walk steps between two probe frames, so consecutive frames of one agent differ."""
WALK_STEPS = 48
"""Each walk restarts at the next val episode after this many steps, so the probe spans many start poses."""
WALK_PROBS = torch.tensor([0.6, 0.2, 0.2])  # forward, left, right: never STOP
MAX_POSITION_DATAPOINTS = 200_000


def probe_observations(cfg: TrainConfig, sensors: list[str], n: int, seed: int = 0,
                       num_envs: int = 32) -> dict[str, torch.Tensor]:
    """``n`` observations (``sensors`` only) from the val split of ``cfg``'s dataset, fixed by ``seed``."""
    if n < 1:
        raise ValueError(f"--probe {n}: need at least 1 observation")
    probe = OmegaConf.merge(cfg, {"sim": {"sensors": list(sensors), "device": "cpu"},
                                  "task": {"type": "pointnav", "split": "val", "max_episode_steps": WALK_STEPS}})
    ensure_dataset(probe.task, probe.dataset, log=lambda *_: None)
    num_envs = min(num_envs, n)
    envs = make_vector_env(probe, "val", num_envs, seed=seed)
    gen = torch.Generator().manual_seed(seed)
    obs, frames, count = envs.reset(), [], 0
    while count < n:
        for _ in range(STRIDE):
            obs = envs.step(torch.multinomial(WALK_PROBS, num_envs, replacement=True, generator=gen) + 1).obs
        frames.append({k: obs[k].clone() for k in sensors})
        count += num_envs
    return {k: torch.cat([f[k] for f in frames])[:n] for k in sensors}


def layer_names(policy) -> list[str]:
    """Every stage of the encoder (its contract's ``stage_names``), then visual_fc."""
    return [*policy.encoder.stage_names, "visual_fc"]


@torch.no_grad()
def activations(policy, obs: dict[str, torch.Tensor], conv: str = "pool", seed: int = 0, batch: int = 256):
    """{layer: (neuron-major float64 [neurons, datapoints], pairing key)}; layers pair only on equal keys."""
    n = next(iter(obs.values())).shape[0]
    names = layer_names(policy)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in names}
    keys: dict[str, object] = {}
    picks: dict[tuple[int, int], np.ndarray] = {}
    for start in range(0, n, batch):
        x = policy.visual_input({k: v[start:start + batch] for k, v in obs.items()})
        outs = policy.encoder.stages(x)
        outs.append(policy.visual_fc(torch.flatten(outs[-1], 1)))
        for name, a in zip(names, outs):
            a = a.double()
            if a.dim() == 4 and conv == "positions":
                b, c, h, w = a.shape
                if (h, w) not in picks:  # the same positions of the same images for every network
                    k = max(1, min(h * w, MAX_POSITION_DATAPOINTS // n))
                    rng = np.random.default_rng([seed, h, w])
                    picks[(h, w)] = np.stack([rng.choice(h * w, k, replace=False) for _ in range(n)])
                idx = torch.from_numpy(picks[(h, w)][start:start + b])
                a = torch.gather(a.reshape(b, c, h * w), 2, idx[:, None, :].expand(b, c, -1))
                parts[name].append(a.permute(1, 0, 2).reshape(c, -1).numpy())
                keys[name] = (h, w)
            else:
                a = a.mean(dim=(2, 3)) if a.dim() == 4 else a
                parts[name].append(a.T.numpy())
                keys[name] = "image"
    return {k: (np.concatenate(v, axis=1), keys[k]) for k, v in parts.items()}


def similarity(name_a: str, a, name_b: str, b, min_ratio: float) -> tuple[float, float] | None:
    """(PWCCA, CKA) of two layers, None when they do not pair (different map sizes under --conv positions)."""
    (xa, ka), (xb, kb) = a, b
    if ka != kb:
        return None
    neurons, datapoints = max(xa.shape[0], xb.shape[0]), xa.shape[1]
    try:
        check_datapoints(neurons, datapoints, min_ratio=min_ratio, strict=True)
    except ValueError:
        raise ValueError(f"compare-reps: layers {name_a} x {name_b}: {datapoints} datapoints for {neurons} neurons "
                         f"(< {min_ratio:g} per neuron); raise --probe to >= {math.ceil(min_ratio * neurons)} "
                         "or leave the layer out with --layers") from None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")  # --min-ratio below 5 warns (InsufficientDatapointsWarning)
            return pwcca(xa, xb, symmetric=True), linear_cka(xa, xb)
    except ValueError as e:  # e.g. a layer of dead units: every neuron constant over the probe
        raise ValueError(f"compare-reps: layers {name_a} x {name_b}: {e}") from None


def compare(path_a: str, path_b: str, *, layers: list[str] | None = None, probe: int = DEFAULT_PROBE,
            seed: int = 0, baseline: str | None = None, conv: str = "pool", min_ratio: float = 5.0,
            data_dir: str | None = None) -> dict:
    """Everything ``compare-reps`` reports, as a JSON-able dict."""
    if conv not in ("pool", "positions"):
        raise ValueError(f"--conv {conv}: use pool or positions")
    paths = {"a": path_a, "b": path_b, **({"baseline": baseline} if baseline else {})}
    nets, cfgs = {}, {}
    for k, p in paths.items():
        nets[k], cfgs[k] = policy_from_checkpoint(p)
        if nets[k].encoder is None:
            raise ValueError(f"checkpoint {p}: a blind agent has no visual encoder to compare")
    resolutions = {k: c.sim.resolution for k, c in cfgs.items()}
    if len(set(resolutions.values())) > 1:
        raise ValueError(f"compare-reps: checkpoints see images of different sizes {resolutions}; one probe set "
                         "cannot serve them")
    cfg = cfgs["a"] if data_dir is None else OmegaConf.merge(cfgs["a"], {"task": {"data_dir": data_dir}})
    for k in ("a", "b"):  # the random-init baselines: A's and B's architectures, untrained
        torch.manual_seed(seed)
        nets[f"random_{k}"] = Policy(policy_spaces(cfgs[k]), cfgs[k].policy).eval()
    same_arch = OmegaConf.to_container(cfgs["a"].policy) == OmegaConf.to_container(cfgs["b"].policy)
    if same_arch and cfgs["a"].sim.sensors == cfgs["b"].sim.sensors:
        del nets["random_b"]  # the same network as random_a: reuse its activations
    sensors = sorted({s for c in cfgs.values() for s in c.sim.sensors})
    obs = probe_observations(cfg, sensors, probe, seed)
    acts = {k: activations(net, obs, conv, seed) for k, net in nets.items()}
    acts.setdefault("random_b", acts["random_a"])
    names = {k: list(v) for k, v in acts.items()}
    if layers:
        unknown = [n for n in layers if n not in names["a"] and n not in names["b"]]
        if unknown:
            raise ValueError(f"--layers: unknown layer(s) {unknown}; A has {names['a']}, B has {names['b']}")
        names = {k: [n for n in v if n in layers] for k, v in names.items()}
    la, lb = names["a"], names["b"]
    pairs = [[similarity(x, acts["a"][x], y, acts["b"][y], min_ratio) for y in lb] for x in la]
    per_layer = {}
    for name in [n for n in la if n in lb]:
        s = similarity(name, acts["a"][name], name, acts["b"][name], min_ratio)
        if s is None:  # same name, other map size (--conv positions across architectures)
            continue
        row = {"pwcca": s[0], "cka": s[1]}
        for other, base in (("random_a", "a"), ("random_b", "b"), ("baseline", "a")):
            if other in acts and name in acts[other]:
                s = similarity(name, acts[base][name], name, acts[other][name], min_ratio)
                row.update({f"pwcca_{base}_vs_{other}": s[0], f"cka_{base}_vs_{other}": s[1]} if s else {})
        per_layer[name] = row
    return {
        "checkpoints": {k: str(Path(p).resolve()) for k, p in paths.items()},
        "runs": {k: c.name for k, c in cfgs.items()},
        "tasks": {k: c.task.type for k, c in cfgs.items()},
        "probe": {"observations": probe, "seed": seed, "split": "val", "data_dir": str(cfg.task.data_dir),
                  "sensors": sensors, "conv": conv, "min_ratio": min_ratio},
        "layers_a": la, "layers_b": lb,
        "neurons_a": {n: int(acts["a"][n][0].shape[0]) for n in la},
        "neurons_b": {n: int(acts["b"][n][0].shape[0]) for n in lb},
        "datapoints": {n: int(acts["a"][n][0].shape[1]) for n in la},
        "pwcca": [[None if s is None else s[0] for s in row] for row in pairs],
        "cka": [[None if s is None else s[1] for s in row] for row in pairs],
        "per_layer": per_layer,
    }


def format_table(result: dict) -> str:
    """One row per layer common to A and B: A-B similarity beside its baselines."""
    cols = [("pwcca", "PWCCA A-B"), ("cka", "CKA A-B"), ("pwcca_a_vs_random_a", "PWCCA A-rand"),
            ("cka_a_vs_random_a", "CKA A-rand"), ("pwcca_b_vs_random_b", "PWCCA B-rand"),
            ("cka_b_vs_random_b", "CKA B-rand"), ("pwcca_a_vs_baseline", "PWCCA A-C"), ("cka_a_vs_baseline", "CKA A-C")]
    cols = [c for c in cols if any(c[0] in row for row in result["per_layer"].values())]
    head = f"{'layer':<14}" + "".join(f"{title:>14}" for _, title in cols)
    lines = [head, "-" * len(head)]
    for name, row in result["per_layer"].items():
        lines.append(f"{name:<14}" + "".join(f"{row[k]:>14.3f}" if k in row else f"{'-':>14}" for k, _ in cols))
    return "\n".join(lines)


def plot(result: dict, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ddppo.analysis.plot import save_figure

    fig, axes = plt.subplots(1, 3, figsize=(17, 5))
    for ax, metric in zip(axes[:2], ("pwcca", "cka")):
        m = np.array([[np.nan if v is None else v for v in row] for row in result[metric]], float)
        im = ax.imshow(m, vmin=0, vmax=1, cmap="viridis")
        for (i, j), v in np.ndenumerate(m):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="w" if v < 0.6 else "k", fontsize=8)
        ax.set_xticks(range(len(result["layers_b"])), result["layers_b"], rotation=45, ha="right")
        ax.set_yticks(range(len(result["layers_a"])), result["layers_a"])
        ax.set_xlabel(f"B: {result['runs']['b']}")
        ax.set_ylabel(f"A: {result['runs']['a']}")
        ax.set_title(metric.upper())
        fig.colorbar(im, ax=ax, fraction=0.046)
    names = list(result["per_layer"])
    series = [k for k in ("pwcca", "pwcca_a_vs_random_a", "pwcca_a_vs_baseline")
              if any(k in r for r in result["per_layer"].values())]
    width = 0.8 / max(1, len(series))
    for s, key in enumerate(series):
        vals = [result["per_layer"][n].get(key, np.nan) for n in names]
        axes[2].bar(np.arange(len(names)) + s * width, vals, width, label=key.replace("pwcca_", "").replace(
            "pwcca", "a_vs_b"))
    axes[2].set_xticks(np.arange(len(names)) + 0.4 - width / 2, names, rotation=45, ha="right")
    axes[2].set_ylim(0, 1)
    axes[2].set_title("PWCCA per layer, with baselines")
    axes[2].legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def run_compare(args) -> int:
    layers = [s for s in args.layers.split(",") if s] if args.layers else None
    result = compare(args.ckpt_a, args.ckpt_b, layers=layers, probe=args.probe, seed=args.seed,
                     baseline=args.baseline, conv=args.conv, min_ratio=args.min_ratio, data_dir=args.data_dir)
    runs = result["runs"]
    out = Path(args.out) if args.out else Path("runs") / "compare_reps" / f"{runs['a']}-vs-{runs['b']}"
    atomic_write_text(out / "compare_reps.json", json.dumps(result, indent=1))
    png = plot(result, out / "compare_reps.png")
    print(format_table(result))
    print(f"wrote {out / 'compare_reps.json'} and {png}")
    return 0
