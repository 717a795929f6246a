"""The ``ddppo`` command: each subcommand's handler (its arguments: ddppo.launch.arguments)."""

from __future__ import annotations

import shlex
import signal
import sys
from pathlib import Path

import ddppo  # noqa: F401  (registers the gymnasium environment)
from ddppo.launch.arguments import build_parser, default_config, parse, parse_train_args

__all__ = ["build_parser", "default_config", "main"]


def _dataset_generate(args) -> int:
    from ddppo.config import DatasetConfig, load_config
    from ddppo.sim.dataset_dir import generate_dataset

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
    from ddppo.bench.throughput import print_json, record

    print_json(result)
    if args.record:
        record(result, args.command_line, args.results)
        print(f"recorded in {args.results}", file=sys.stderr)
    return 0


def _bench_sim(args) -> int:
    from ddppo.bench.throughput import bench_sim

    return _bench_output(args, bench_sim(args.num_envs, args.resolution, args.sensors.split(","), args.device,
                                         args.steps, args.data_dir, warmup=args.warmup,
                                         episode_steps=args.episode_steps, stop=args.stop))


def _bench_backends(args) -> int:
    import os

    os.environ.setdefault("HABITAT_SIM_LOG", "quiet")  # habitat-sim logs every simulator start otherwise
    os.environ.setdefault("MAGNUM_LOG", "quiet")
    from ddppo.bench.backends import bench_backends

    return _bench_output(args, bench_backends(args.num_envs, args.resolution, args.sensors.split(","), args.steps,
                                              args.warmup, args.data_dir, rounds=args.rounds))


def _bench_train(args) -> int:
    from ddppo.bench.throughput import bench_train

    return _bench_output(args, bench_train(args.overrides, args.updates, args.config or default_config()))


def _bench_peer(args) -> int:
    try:
        from ddppo.bench.peer import bench_peer
    except ModuleNotFoundError as e:  # the benchmark-only extra is missing: say how to install it, in one line
        print(f"ddppo: error: {e}", file=sys.stderr)
        return 2
    return _bench_output(args, bench_peer(args.overrides, args.frames, args.val_episodes,
                                          args.config or default_config(), tuple(args.peers.split(",")),
                                          args.repeats))


def _slurm_train(args) -> int:
    import json

    from ddppo.launch.slurm import submit_train

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
    from ddppo.bench.throughput import bench_scaling

    return _bench_output(args, bench_scaling(args.overrides, args.updates, args.config or default_config(),
                                             repeats=args.repeats))


def _slurm_eval(args) -> int:
    from ddppo.launch.slurm import submit_eval

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
    from ddppo.launch.eval_command import run_eval

    return run_eval(args)


def _plot(args) -> int:
    from ddppo.analysis.plot import plot_runs

    out = plot_runs(args.runs, args.out, tuple(args.metrics.split(",")), args.smooth)
    print(f"wrote {out}")
    return 0


def _compare_reps(args) -> int:
    from ddppo.analysis.compare import run_compare

    return run_compare(args)


def run_training(config_file: str | None, overrides: list[str], fresh: bool = False) -> int:
    """Load the config, train, and return the exit code: 0, EXIT_REQUEUE after SIGUSR1, 2 on an error (bad input,
    a diverged run, a full disk: one line naming the problem, no traceback)."""
    from ddppo.config import load_config
    from ddppo.sim.environments import require_backend
    from ddppo.trainer.loop import EXIT_REQUEUE, train

    try:
        cfg = load_config(config_file, overrides)
        require_backend(cfg)
        result = train(cfg, fresh=fresh)
    except (ValueError, OSError, FloatingPointError) as e:
        print(f"ddppo train: error: {e}", file=sys.stderr)
        return 2
    return EXIT_REQUEUE if result["signal"] == signal.SIGUSR1 else 0


def train_script(argv=None) -> int:
    """``python ddppo/train.py`` and ``torchrun ddppo/train.py``: ``ddppo train``'s arguments, read by its parser,
    but without the packaged default YAML: no --config means the dataclass defaults alone."""
    args = parse_train_args(argv)
    return run_training(args.config, args.overrides, args.fresh)


def _train(args) -> int:
    return run_training(args.config or default_config(), args.overrides, args.fresh)


HANDLERS = {
    "train": _train, "eval": _eval, "plot": _plot, "compare_reps": _compare_reps,
    "dataset_generate": _dataset_generate, "scene_export": _scene_export,
    "bench_sim": _bench_sim, "bench_backends": _bench_backends, "bench_train": _bench_train,
    "bench_scaling": _bench_scaling, "bench_peer": _bench_peer,
    "slurm_train": _slurm_train, "slurm_eval": _slurm_eval,
}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse(argv)
    args.command_line = shlex.join(["ddppo", *argv])  # what --record writes
    try:
        return HANDLERS[args.handler](args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"ddppo: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
