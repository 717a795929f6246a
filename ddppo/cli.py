"""The ``ddppo`` command."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

import ddppo  # noqa: F401  (registers the gymnasium environment)


def _dataset_generate(args) -> int:
    from ddppo.config import DatasetConfig, load_config
    from ddppo.sim.data import generate_dataset

    cfg = load_config(args.config, args.overrides, schema=DatasetConfig)
    generate_dataset(args.out, cfg, force=args.force)
    return 0


def _scene_export(args) -> int:
    import os

    # habitat-sim (when it computes navmeshes) and its renderer library log every step to the console otherwise
    os.environ.setdefault("HABITAT_SIM_LOG", "quiet")
    os.environ.setdefault("MAGNUM_LOG", "quiet")
    from ddppo.sim.scene_export import export

    export(args.source, args.out, args.split)
    return 0


def _bench_output(args, result: dict) -> int:
    """Every bench prints its JSON; with --record it is also appended to the results file."""
    from ddppo.bench import print_json, record

    print_json(result)
    if args.record:
        record(result, args.command_line, args.results)
        print(f"recorded in {args.results}", file=sys.stderr)
    return 0


def _bench_sim(args) -> int:
    from ddppo.bench import bench_sim

    return _bench_output(args, bench_sim(args.num_envs, args.resolution, args.sensors.split(","), args.device,
                                         args.steps, args.data_dir, warmup=args.warmup,
                                         episode_steps=args.episode_steps, stop=args.stop))


def _bench_backends(args) -> int:
    import os

    os.environ.setdefault("HABITAT_SIM_LOG", "quiet")  # habitat-sim logs every simulator start otherwise
    os.environ.setdefault("MAGNUM_LOG", "quiet")
    from ddppo.bench_backends import bench_backends

    return _bench_output(args, bench_backends(args.num_envs, args.resolution, args.sensors.split(","), args.steps,
                                              args.warmup, args.data_dir, rounds=args.rounds))


def _bench_train(args) -> int:
    from ddppo.bench import bench_train

    return _bench_output(args, bench_train(args.overrides, args.updates, args.config or default_config()))


def _bench_peer(args) -> int:
    try:
        from ddppo.bench_peer import bench_peer
    except ModuleNotFoundError as e:  # the benchmark-only extra is missing: say how to install it, in one line
        print(f"ddppo: error: {e}", file=sys.stderr)
        return 2
    return _bench_output(args, bench_peer(args.overrides, args.frames, args.val_episodes,
                                          args.config or default_config(), tuple(args.peers.split(",")),
                                          args.repeats))


def _slurm_train(args) -> int:
    import json

    from ddppo.slurm import submit_train

    jobs = submit_train(args.config or default_config(), args.overrides, args.sweep, nodes=args.nodes,
                        gpus_per_node=args.gpus_per_node, tasks_per_node=args.tasks_per_node,
                        cpus_per_task=args.cpus_per_task, mem=args.mem, time_limit=args.time,
                        partition=args.partition, account=args.account, max_parallel=args.max_parallel,
                        signal_delay_s=args.signal_delay, log_dir=args.log_dir)
    if args.wait:
        for job in jobs:
            print(json.dumps({"job_id": job.job_id, "results": job.results()}, default=str))
    return 0


def _bench_scaling(args) -> int:
    from ddppo.bench import bench_scaling

    return _bench_output(args, bench_scaling(args.overrides, args.updates, args.config or default_config(),
                                             repeats=args.repeats))


def _slurm_eval(args) -> int:
    from ddppo.slurm import submit_eval

    if not args.eval_args:
        raise ValueError("ddppo slurm eval: name the checkpoint (and any `ddppo eval` options) after the options")
    job = submit_eval(args.eval_args, tasks=args.tasks, cpus_per_task=args.cpus_per_task,
                      gpus_per_node=args.gpus_per_node, mem=args.mem, time_limit=args.time,
                      partition=args.partition, account=args.account, log_dir=args.log_dir)
    if args.wait:
        job.results()
        print(Path(str(job.paths.stdout)).read_text())
    return 0


def _eval(args) -> int:
    from ddppo.evaluation_cli import run_eval

    return run_eval(args)


def _plot(args) -> int:
    from ddppo.plot import plot_runs

    out = plot_runs(args.runs, args.out, tuple(args.metrics.split(",")), args.smooth)
    print(f"wrote {out}")
    return 0


def _compare_reps(args) -> int:
    from ddppo.transfer.compare import run_compare

    return run_compare(args)


def default_config() -> str:
    """configs/quickstart.yaml of the checkout this package runs from (pip install -e .)."""
    path = Path(__file__).resolve().parent.parent / "configs" / "quickstart.yaml"
    if not path.is_file():
        raise FileNotFoundError(f"default config {path} not found; pass --config FILE")
    return str(path)


def default_results() -> str:
    """bench/RESULTS.md of the checkout this package runs from."""
    return str(Path(__file__).resolve().parent.parent / "bench" / "RESULTS.md")


def _add_record_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--record", action="store_true",
                        help="also append the result (command, machine, date, JSON) to the results file")
    parser.add_argument("--results", default=default_results(), help="results file (default: bench/RESULTS.md)")


def _train(args) -> int:
    from ddppo.train import run_training

    return run_training(args.config or default_config(), args.overrides, args.fresh)


def parse_train_args(argv: list[str] | None = None) -> argparse.Namespace:
    """``ddppo train``'s arguments (``--config`` None when not given), for the script form ``ddppo/train.py``."""
    return _parse(build_parser(), ["train", *(sys.argv[1:] if argv is None else argv)])


def _add_resource_options(parser: argparse.ArgumentParser, time_default: str) -> None:
    """The SLURM resource request shared by ``slurm train`` and ``slurm eval``."""
    parser.add_argument("--gpus-per-node", type=int, default=0, help="one task per GPU; 0 = CPU workers")
    parser.add_argument("--cpus-per-task", type=int, default=2)
    parser.add_argument("--mem", default=None, help="memory per node, e.g. 32G")
    parser.add_argument("--time", default=time_default, help="[D-]HH:MM[:SS] or minutes")
    parser.add_argument("--partition", default=None)
    parser.add_argument("--account", default=None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ddppo", description="DD-PPO for embodied PointGoal navigation")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a PointNav agent (defaults: configs/quickstart.yaml)")
    t.add_argument("--config", default=None, help="YAML overrides (default: the packaged quickstart config)")
    t.add_argument("--fresh", action="store_true", help="start over instead of resuming the run directory")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.set_defaults(func=_train)

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
    e.set_defaults(func=_eval, sample=None)

    pl = sub.add_parser("plot", help="learning curves of runs as a PNG")
    pl.add_argument("runs", nargs="+", help="run directories (runs/<name>)")
    pl.add_argument("--out", default="curves.png")
    pl.add_argument("--metrics", default="episode/success,episode/spl")
    pl.add_argument("--smooth", type=int, default=1, help="moving average over this many points")
    pl.set_defaults(func=_plot)

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
    cr.set_defaults(func=_compare_reps)

    d = sub.add_parser("dataset", help="datasets of the embedded simulator")
    dsub = d.add_subparsers(dest="dataset_command", required=True)
    g = dsub.add_parser("generate", help="generate scenes and PointNav episodes (habitat json.gz schema)")
    g.add_argument("--out", default="data/pointnav")
    g.add_argument("--config", default=None, help="YAML overriding DatasetConfig")
    g.add_argument("--force", action="store_true", help="replace an existing dataset directory")
    g.add_argument("overrides", nargs="*", help="key=value, e.g. scenes.train=10 episodes_per_scene.train=50")
    g.set_defaults(func=_dataset_generate)

    sc = sub.add_parser("scene", help="scenes of the embedded simulator")
    scsub = sc.add_subparsers(dest="scene_command", required=True)
    x = scsub.add_parser("export", help="export scenes as meshes habitat-sim loads (.glb, + .navmesh where "
                                        "habitat-sim imports) and a dataset's episodes with them")
    x.add_argument("source", help="a scene file (.npz) or a dataset directory (as `ddppo dataset generate` writes)")
    x.add_argument("--out", required=True, help="output directory: then task.data_dir=OUT task.scenes_dir=OUT "
                                                "sim.backend=habitat runs the exported dataset")
    x.add_argument("--split", action="append", choices=["train", "val", "test"],
                   help="split of a dataset to export (repeatable; default: every split it has)")
    x.set_defaults(func=_scene_export)

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
    s.set_defaults(func=_bench_sim)
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
    bk.set_defaults(func=_bench_backends)
    tr = bsub.add_parser("train", help="end-to-end training env-steps/s and its ratio to the serial limit")
    tr.add_argument("--config", default=None, help="YAML (default: the quickstart config)")
    tr.add_argument("--updates", type=int, default=10)
    tr.add_argument("overrides", nargs="*")
    _add_record_options(tr)
    tr.set_defaults(func=_bench_train)
    sc = bsub.add_parser("scaling", help="1 vs 2 Gloo ranks, and a 2x straggler with and without preemption")
    sc.add_argument("--config", default=None, help="YAML (default: the quickstart config)")
    sc.add_argument("--updates", type=int, default=12)
    sc.add_argument("--repeats", type=int, default=1, help="rounds of all four runs, the order reversed every "
                                                           "other round; rates and ratios are the rounds' medians")
    sc.add_argument("overrides", nargs="*")
    _add_record_options(sc)
    sc.set_defaults(func=_bench_scaling)
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
    pe.set_defaults(func=_bench_peer)

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
    st.set_defaults(func=_slurm_train)

    se = slsub.add_parser("eval", help="ddppo eval as a SLURM job (requeued and rerun when preempted)")
    se.add_argument("--tasks", type=int, default=1, help="ranks sharing the episodes")
    _add_resource_options(se, "4:00:00")
    se.add_argument("--log-dir", default="runs/slurm_logs")
    se.add_argument("--wait", action="store_true")
    se.add_argument("eval_args", nargs=argparse.REMAINDER, help="what `ddppo eval` takes: CHECKPOINT [options]")
    se.set_defaults(func=_slurm_eval)

    return p


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # key=value overrides may follow options (`ddppo eval CKPT --episodes 10 policy.x=1`), which argparse's
    # positional matching does not allow: collect them here
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(a.startswith("-") or "=" not in a for a in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = _parse(build_parser(), argv)
    args.command_line = shlex.join(["ddppo", *argv])  # what --record writes
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ddppo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
