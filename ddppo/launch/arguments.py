"""The ``ddppo`` command's arguments: one parser for every subcommand (``ddppo.launch.cli`` runs them; the script
form of training, ``ddppo/train.py``, and ``ddppo slurm eval``'s jobs parse with it too). Each subcommand names its
handler in ``args.handler``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def default_config() -> str:
    """configs/quickstart.yaml of the checkout this package runs from (pip install -e .)."""
    path = Path(__file__).resolve().parents[2] / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"default config {path} not found; pass --config FILE")
    return str(path)


def default_results() -> str:
    """bench/LOG.md of the checkout this package runs from: the history that ``--record`` appends to (bench/RESULTS.md
    is the page of current figures, written by hand from it)."""
    return str(Path(__file__).resolve().parents[2] / "bench" / "LOG.md")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddppo", description="DD-PPO for embodied PointGoal navigation")
    sub = p.add_subparsers(dest="command", required=True)
    _add_run_commands(sub)
    _add_data_commands(sub)
    _add_bench_commands(sub)
    _add_slurm_commands(sub)
    return p


def parse(argv: list[str]) -> argparse.Namespace:
    """``argv`` parsed; key=value overrides may also follow options (``ddppo eval CKPT --episodes 10 policy.x=1``),
    which argparse's positional matching does not allow: they are collected here."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``ddppo train``'s arguments (``--config`` None when not given), for the script form ``ddppo/train.py``."""
    return parse(["train", *(sys.argv[1:] if argv is None else argv)])


def _add_run_commands(sub) -> None:
    """train, eval, plot, compare-reps."""
    t = sub.add_parser("train", help="train a PointNav agent (defaults: configs/quickstart.yaml)")
    t.add_argument("--config", default=None, help="YAML overrides (default: the packaged quickstart config)")
    t.add_argument("--fresh", action="store_true", help="start over instead of resuming the run directory")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.set_defaults(handler="train")

    e = sub.add_parser("eval", help="evaluate a checkpoint on a split (also under torchrun)")
    e.add_argument("checkpoint")
    e.add_argument("--split", default="val", choices=["train", "val", "test"])
    e.add_argument("--protocol", choices=["ddppo", "habitat"], default=None,
                   help="ddppo: most likely action, first 100 episodes (default); habitat: sampled actions, every "
                        "episode (habitat-baselines' evaluator)")
    e.add_argument("--episodes", type=int, default=None, help="the first N episodes of the split (0 = all)")
    mode = e.add_mutually_exclusive_group()
    mode.add_argument("--deterministic", dest="sample", action="store_false", help="most likely action (default)")
    mode.add_argument("--sample", dest="sample", action="store_true", help="sample actions from the policy")
    e.add_argument("--agents", default="oracle,random,forward,untrained",
                   help="reference agents evaluated beside the checkpoint ('' for none)")
    e.add_argument("--num-envs", type=int, default=8, help="environments per process")
    e.add_argument("--out", default=None, help="output directory (default: <run>/eval/<split>)")
    e.add_argument("--video", type=int, default=0, help="record videos of the first N episodes")
    e.add_argument("overrides", nargs="*", help="key=value overrides of the checkpoint's config")
    e.set_defaults(handler="eval", sample=None)

    pl = sub.add_parser("plot", help="learning curves of runs as a PNG")
    pl.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    pl.add_argument("--out", default="curves.png")
    pl.add_argument("--metrics", default="episode/success,episode/spl")
    pl.add_argument("--smooth", type=int, default=1,
                    help="moving average over this many points (training windows; eval/* points are drawn as they are)")
    pl.set_defaults(handler="plot")

    cr = sub.add_parser("compare-reps", help="PWCCA and linear CKA between two checkpoints' encoders, per layer")
    cr.add_argument("ckpt_a")
    cr.add_argument("ckpt_b")
    cr.add_argument("--layers", default=None, help="comma-separated layer names (default: every encoder stage "
                                                   "and visual_fc)")
    cr.add_argument("--probe", type=int, default=3000, help="probe observations from the val scenes")
    cr.add_argument("--seed", type=int, default=0, help="seed of the probe set and of the random-init baseline")
    cr.add_argument("--baseline", default=None, help="a third checkpoint (e.g. A's task, another seed) compared "
                                                     "with A layer by layer")
    cr.add_argument("--conv", default="pool", choices=["pool", "positions"],
                    help="conv maps: average-pooled, or every spatial position a datapoint")
    cr.add_argument("--min-ratio", type=float, default=5.0, help="refuse pairs with fewer datapoints per neuron")
    cr.add_argument("--data-dir", default=None, help="dataset of the probe (default: checkpoint A's)")
    cr.add_argument("--out", default=None, help="output directory (default: runs/compare_reps/<A>-vs-<B>)")
    cr.set_defaults(handler="compare_reps")


def _add_data_commands(sub) -> None:
    """dataset generate, scene export."""
    d = sub.add_parser("dataset", help="datasets of the embedded simulator")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    g = dsub.add_parser("generate", help="generate scenes and PointNav episodes (habitat json.gz schema)")
    g.add_argument("--out", default="data/pointnav")
    g.add_argument("--config", default=None, help="YAML overriding DatasetConfig")
    g.add_argument("--force", action="store_true", help="replace an existing dataset directory")
    g.add_argument("overrides", nargs="*", help="key=value, e.g. scenes.train=10 episodes_per_scene.train=50")
    g.set_defaults(handler="dataset_generate")

    sc = sub.add_parser("scene", help="scenes of the embedded simulator")
    scsub = sc.add_subparsers(dest="scene_command", required=True)
    x = scsub.add_parser("export", help="export scenes as meshes habitat-sim loads (.glb, + .navmesh where "
                                        "habitat-sim imports) and a dataset's episodes with them")
    x.add_argument("source", help="a scene file (.npz) or a dataset directory (as `ddppo dataset generate` writes)")
    x.add_argument("--out", required=True, help="output directory: then task.data_dir=OUT task.scenes_dir=OUT "
                                                "sim.backend=habitat runs the exported dataset")
    x.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="split of a dataset to export (repeatable; default: every split it has)")
    x.set_defaults(handler="scene_export")


def _add_bench_commands(sub) -> None:
    b = sub.add_parser("bench", help="throughput benchmarks (JSON)")
    bsub = b.add_subparsers(dest="bench_command", required=True)
    s = bsub.add_parser("sim", help="simulator env-steps/s")
    s.add_argument("--num-envs", type=int, default=64)
    s.add_argument("--resolution", type=int, default=64)
    s.add_argument("--sensors", default="depth", help="comma-separated: depth,rgb")
    s.add_argument("--device", default="cpu")
    s.add_argument("--steps", type=int, default=300)
    s.add_argument("--data-dir", default="data/pointnav")
    s.add_argument("--warmup", type=int, default=300, help="untimed steps first (kernels, geodesic cache)")
    s.add_argument("--episode-steps", type=int, default=100, help="episode length limit (a trained agent's)")
    s.add_argument("--stop", action="store_true", help="draw STOP too (episodes of ~4 steps: a reset benchmark)")
    _add_record_options(s)
    s.set_defaults(handler="bench_sim")
    bk = bsub.add_parser("backends", help="the embedded simulator against habitat-sim on the same exported scenes")
    bk.add_argument("--num-envs", type=int, default=4)
    bk.add_argument("--resolution", type=int, default=64)
    bk.add_argument("--sensors", default="depth", help="comma-separated: depth,rgb")
    bk.add_argument("--steps", type=int, default=200)
    bk.add_argument("--warmup", type=int, default=50, help="untimed steps first, every round")
    bk.add_argument("--rounds", type=int, default=3, help="rounds, the order of the two reversed every other round")
    bk.add_argument("--data-dir", default="data/pointnav_bench",
                    help="embedded dataset (generated when missing); its export goes to DATA_DIR_habitat")
    _add_record_options(bk)
    bk.set_defaults(handler="bench_backends")
    tr = bsub.add_parser("train", help="end-to-end training env-steps/s and its ratio to the serial limit")
    tr.add_argument("--config", default=None, help="YAML (default: the quickstart config)")
    tr.add_argument("--updates", type=int, default=10)
    tr.add_argument("overrides", nargs="*")
    _add_record_options(tr)
    tr.set_defaults(handler="bench_train")
    sc = bsub.add_parser("scaling", help="1 vs 2 Gloo ranks, and a 2x straggler with and without preemption")
    sc.add_argument("--config", default=None, help="YAML (default: the quickstart config)")
    sc.add_argument("--updates", type=int, default=12)
    sc.add_argument("--repeats", type=int, default=1, help="rounds of all four runs, the order reversed every "
                                                           "other round; rates and ratios are the rounds' medians")
    sc.add_argument("overrides", nargs="*")
    _add_record_options(sc)
    sc.set_defaults(handler="bench_scaling")
    pe = bsub.add_parser("peer", help="ddppo vs stable-baselines3 PPO (against ddppo with a feed-forward core) and "
                                      "sb3-contrib RecurrentPPO, same env, encoder and batch sizes (needs the bench "
                                      "extra)")
    pe.add_argument("--config", default=None, help="YAML (default: the quickstart config)")
    pe.add_argument("--frames", type=int, default=100_000, help="env-steps each trainer runs")
    pe.add_argument("--val-episodes", type=int, default=100, help="val episodes each trained agent is evaluated on")
    pe.add_argument("--peers", default="recurrent_ppo,ppo", help="comma-separated: recurrent_ppo,ppo")
    pe.add_argument("--repeats", type=int, default=1,
                    help="rounds of every trainer, the order reversed every other round; ratios are the median of the "
                         "rounds' ratios (a machine's drift between runs moves a single ratio)")
    pe.add_argument("overrides", nargs="*")
    _add_record_options(pe)
    pe.set_defaults(handler="bench_peer")


def _add_slurm_commands(sub) -> None:
    sl = sub.add_parser("slurm", help="submit to SLURM through submitit")
    slsub = sl.add_subparsers(dest="slurm_command", required=True)
    st = slsub.add_parser("train", help="one run, a multi-node run, or an array sweep (--sweep)")
    st.add_argument("--config", default=None)
    st.add_argument("--nodes", type=int, default=1)
    st.add_argument("--tasks-per-node", type=int, default=None, help="workers per node (default: GPUs or 1)")
    _add_resource_options(st, "72:00:00")
    st.add_argument("--sweep", action="append", default=[], help="key=v1,v2 (repeatable: cartesian product)")
    st.add_argument("--max-parallel", type=int, default=0, help="array elements running at once (0 = no cap)")
    st.add_argument("--signal-delay", type=int, default=90, help="seconds of SIGUSR1 warning before the limit")
    st.add_argument("--log-dir", default=None)
    st.add_argument("--wait", action="store_true", help="wait for the jobs and print their results")
    st.add_argument("overrides", nargs="*")
    st.set_defaults(handler="slurm_train")

    se = slsub.add_parser("eval", help="ddppo eval as a SLURM job (requeued and rerun when preempted)")
    se.add_argument("--tasks", type=int, default=1, help="ranks sharing the episodes")
    _add_resource_options(se, "4:00:00")
    se.add_argument("--log-dir", default="runs/slurm_logs")
    se.add_argument("--wait", action="store_true")
    se.add_argument("eval_args", nargs=argparse.REMAINDER, help="what `ddppo eval` takes: CHECKPOINT [options]")
    se.set_defaults(handler="slurm_eval")


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true",
                        help="also append the result (command, machine, date, JSON) to the results file")
    parser.add_argument("--results", default=default_results(), help="file --record appends to (default: bench/LOG.md)")


def _add_resource_options(parser: argparse.ArgumentParser, time_default: str) -> None:
    """The SLURM resource request shared by ``slurm train`` and ``slurm eval``."""
    parser.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 = CPU workers")
    parser.add_argument("--cpus-per-task", type=int, default=2)
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 32G")
    parser.add_argument("--time", default=time_default, help="[D-]HH:MM[:SS] or minutes")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)
