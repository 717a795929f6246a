"""The transfer papers' two qualitative claims, at laptop scale (docs/transfer.md has the numbers of a run).

1. A PointNav encoder helps on other navigation tasks: on Flee and Exploration, at equal frames, an agent whose
   visual pathway comes from a PointNav checkpoint (frozen, or fine-tuned) does at least as well as one trained
   from scratch (DD-PPO §6).
2. Encoders trained on different navigation tasks in the same scenes learn alike representations: PWCCA between a
   PointNav encoder and a Flee (or Exploration) encoder trained from scratch is close to PWCCA between two PointNav
   encoders of different seeds, and far above the random-init baseline (Wijmans, Morcos et al. 2020).

    python bench/transfer_experiment.py [--pointnav CKPT] [--frames 150000] [--out runs/transfer_exp]

Every run uses the quickstart's scenes and model (configs/transfer/*.yaml). The PointNav source is --pointnav (e.g.
the quickstart's last checkpoint), copied into --out so later runs cannot move it, or else a quickstart run trained
here (seed 1). The seed-vs-seed baseline of claim 2 is a second PointNav run (seed 2) with the same frame budget as
the downstream runs (seeds 3 and 4), so that the "same task" and "other task" encoders set against the source saw
equally many frames and none shares its initial weights.
Runs go one after another, in-process; running the script again resumes an interrupted run and skips finished ones.
Results: <out>/results.json, a Markdown summary on stdout, learning curves <out>/curves_<task>.png.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from ddppo.analysis.compare import compare, plot  # noqa: E402
from ddppo.analysis.plot import plot_runs, read_curves  # noqa: E402
from ddppo.config import load_config  # noqa: E402
from ddppo.io.atomic import atomic_write_text  # noqa: E402
from ddppo.io.checkpoint import list_checkpoints  # noqa: E402
from ddppo.trainer.loop import train  # noqa: E402

TASKS = {"flee": "distance_from_start", "exploration": "area_covered"}
MODES = ("scratch", "frozen", "finetune")
# Downstream seeds are neither the source's (1) nor the seed baseline's (2): a scratch encoder must not start from
# the source's initial weights, or part of their similarity would be the shared initialisation.


def run(config: Path, name: str, out: Path, frames: int, overrides: list[str], eval_episodes: int) -> dict:
    """One training run (resumed if interrupted, skipped if finished); returns its summary."""
    summary = out / name / "summary.json"
    if summary.is_file():
        s = json.loads(summary.read_text())
        if s.get("env_steps", 0) >= frames and (eval_episodes == 0 or "eval" in s):
            print(f"[{name}] finished before: {summary}", flush=True)
            return s
    cfg = load_config(config, [f"name={name}", f"run_dir={out}", f"total_steps={frames}",
                               f"eval_episodes={eval_episodes}", *overrides])
    t0 = time.perf_counter()
    print(f"[{name}] training {frames} frames: {' '.join(overrides) or '(no overrides)'}", flush=True)
    train(cfg, show_progress=False)
    print(f"[{name}] done in {time.perf_counter() - t0:.0f} s", flush=True)
    return json.loads(summary.read_text())


def curve_points(run_dir: Path, metric: str, frames: int) -> dict[str, float]:
    """The logged training metric (mean over the episodes ended since the previous log) nearest 25/50/75/100%."""
    steps, values = read_curves(run_dir)[f"episode/{metric}"]
    out = {}
    for frac in (0.25, 0.5, 0.75, 1.0):
        k = min(range(len(steps)), key=lambda i: abs(steps[i] - frac * frames))
        out[f"{int(frac * 100)}%"] = values[k]
    # the mean over the last quarter of training: less noisy than one log window
    tail = [v for s, v in zip(steps, values) if s >= 0.75 * frames]
    out["last_quarter_mean"] = sum(tail) / len(tail)
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pointnav", default=None, help="PointNav source checkpoint (default: train the quickstart)")
    p.add_argument("--frames", type=int, default=150_000, help="frames of every downstream and seed-2 run")
    p.add_argument("--seeds", default="3,4", help="seeds of the downstream runs (not 1 or 2: see MODES)")
    p.add_argument("--pointnav-frames", type=int, default=1_200_000, help="frames of the source, when trained here")
    p.add_argument("--eval-episodes", type=int, default=100, help="val episodes evaluated after each run")
    p.add_argument("--probe", type=int, default=3000, help="compare-reps probe observations")
    p.add_argument("--out", default="runs/transfer_exp")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quickstart = ROOT / "configs" / "quickstart.yaml"

    # ---- the PointNav source, pinned inside --out
    source = out / "pointnav_source.pt"
    if not source.is_file():
        if args.pointnav:
            shutil.copy(args.pointnav, source)
        else:
            run(quickstart, "pointnav_seed1", out, args.pointnav_frames, ["seed=1"], 0)
            shutil.copy(list_checkpoints(out / "pointnav_seed1" / "checkpoints")[-1], source)
    results: dict = {"frames": args.frames, "pointnav_source": {"path": str(source), "copied_from": args.pointnav,
                                                                "sha256": sha256(source)}, "tasks": {}}

    # ---- claim 1: the same downstream run with a scratch, frozen and fine-tuned encoder, per seed
    seeds = [int(x) for x in args.seeds.split(",")]
    results["seeds"] = seeds
    for task, metric in TASKS.items():
        config = ROOT / "configs" / "transfer" / f"{task}.yaml"
        rows = {}
        for mode in MODES:
            rows[mode] = {"seeds": {}}
            for seed in seeds:
                name = f"{task}_{mode}_s{seed}"
                extra = [f"seed={seed}"] + ([] if mode == "scratch" else [f"transfer.checkpoint={source}",
                                                                         f"transfer.encoder={mode}"])
                s = run(config, name, out, args.frames, extra, args.eval_episodes)
                rows[mode]["seeds"][str(seed)] = {
                    "val": s["eval"][metric], "val_ci95": s["eval"][f"{metric}_ci95"],
                    "val_episodes": s["eval"]["episodes"], "steady_fps": s.get("steady_fps"),
                    "train_curve": curve_points(out / name, metric, args.frames)}
            per_seed = rows[mode]["seeds"].values()
            rows[mode]["val_mean"] = sum(r["val"] for r in per_seed) / len(seeds)
            rows[mode]["train_last_quarter_mean"] = sum(r["train_curve"]["last_quarter_mean"]
                                                        for r in per_seed) / len(seeds)
        results["tasks"][task] = {"metric": metric, "modes": rows}
        plot_runs([out / f"{task}_{m}_s{seed}" for m in MODES for seed in seeds], out / f"curves_{task}.png",
                  (f"episode/{metric}",), smooth=5)
        atomic_write_text(out / "results.json", json.dumps(results, indent=1))

    # ---- claim 2: PWCCA / CKA of the PointNav encoder with other-task and same-task encoders
    run(quickstart, "pointnav_seed2", out, args.frames, ["seed=2"], 0)
    seed2 = list_checkpoints(out / "pointnav_seed2" / "checkpoints")[-1]
    results["similarity"] = {}
    for task in TASKS:
        other = list_checkpoints(out / f"{task}_scratch_s{seeds[0]}" / "checkpoints")[-1]
        for conv in ("pool", "positions"):  # conv maps averaged per image, or every position a datapoint
            path = out / f"compare_pointnav_vs_{task}_{conv}.json"
            if path.is_file():
                r = json.loads(path.read_text())
            else:
                r = compare(str(source), str(other), baseline=str(seed2), probe=args.probe, seed=0, conv=conv)
                atomic_write_text(path, json.dumps(r, indent=1))
                plot(r, path.with_suffix(".png"))
            results["similarity"][f"{task} ({conv})"] = r["per_layer"]
            atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    print(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [f"Downstream tasks, {results['frames']} frames per run: val metric ± 95% CI over the val episodes "
             "(deterministic policy), and in brackets the training metric (sampled actions) averaged over the last "
             "quarter of frames:", "", "| task | metric | seed | scratch | frozen | finetune |",
             "|---|---|---|---|---|---|"]
    for task, t in results["tasks"].items():
        for seed in results["seeds"]:
            cells = []
            for m in MODES:
                r = t["modes"][m]["seeds"][str(seed)]
                cells.append(f"{r['val']:.2f} ± {r['val_ci95']:.2f} ({r['train_curve']['last_quarter_mean']:.2f})")
            lines.append(f"| {task} | {t['metric']} | {seed} | " + " | ".join(cells) + " |")
        cells = [f"{t['modes'][m]['val_mean']:.2f} ({t['modes'][m]['train_last_quarter_mean']:.2f})" for m in MODES]
        lines.append(f"| {task} | {t['metric']} | mean | " + " | ".join(cells) + " |")
    for key, layers in results.get("similarity", {}).items():
        task, conv = key.split(" ")
        lines += ["", f"PointNav source encoder (A) vs {task} encoder from scratch (B), conv maps {conv[1:-1]}; "
                  f"C = PointNav, seed 2, {results['frames']} frames; rand = untrained network:", "",
                  "| layer | PWCCA A-B | PWCCA A-C | PWCCA A-rand | PWCCA B-rand | CKA A-B | CKA A-C | CKA A-rand |",
                  "|---|---|---|---|---|---|---|---|"]
        for name, r in layers.items():
            lines.append(f"| {name} | {r['pwcca']:.3f} | {r['pwcca_a_vs_baseline']:.3f} | "
                         f"{r['pwcca_a_vs_random_a']:.3f} | {r['pwcca_b_vs_random_b']:.3f} | {r['cka']:.3f} | "
                         f"{r['cka_a_vs_baseline']:.3f} | {r['cka_a_vs_random_a']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
