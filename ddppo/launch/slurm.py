"""``ddppo slurm train``: single runs, multi-node runs and array sweeps on SLURM through submitit.

One SLURM task per GPU (or per CPU worker); torch.distributed meets through the SLURM environment (see
ddppo.distributed). Preemption and time limits: SLURM sends SIGUSR1 ``--signal`` seconds before the end; every
rank saves the resume state at the next update boundary, rank 0 requeues the job (``scontrol requeue``), and the
requeued job resumes from its run directory. SIGTERM saves and exits with code 0 without requeueing.
"""

from __future__ import annotations

import itertools
import re
import shlex
import signal
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from ddppo.config import ConfigError, load_config
from ddppo.sim.environments import require_backend

# Jobs ask to be requeueable: `scontrol requeue` (after SIGUSR1) and SLURM's requeue of the jobs of a failed node
# are refused for jobs that did not ask, on clusters whose JobRequeue is 0.
REQUEUE = {"requeue": True}


def parse_sweep(items: list[str]) -> list[list[str]]:
    """``["a=1,2", "b=x,y"]`` -> the cartesian product as override lists."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item!r} is not key=v1,v2,...")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else [[]]


def run_name(base: str, sweep_overrides: list[str]) -> str:
    if not sweep_overrides:
        return base
    tag = ",".join(o.replace("/", "_") for o in sweep_overrides)
    return f"{base}/{tag}"


def check_request(partition: str | None, nodes: int, tasks_per_node: int, cpus_per_task: int, gpus_per_node: int,
                  mem: str | None, time_limit: str, account: str | None) -> None:
    """Ask SLURM whether it could run this request (``sbatch --test-only``) before anything is submitted."""
    cmd = ["sbatch", "--test-only", f"--nodes={nodes}", f"--ntasks-per-node={tasks_per_node}",
           f"--cpus-per-task={cpus_per_task}", f"--time={time_limit}", "--wrap=true"]
    if partition:
        cmd.append(f"--partition={partition}")
    if gpus_per_node:
        cmd.append(f"--gpus-per-node={gpus_per_node}")
    if mem:
        cmd.append(f"--mem={mem}")
    if account:
        cmd.append(f"--account={account}")
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise ConfigError("sbatch not found: this machine is not a SLURM submit host") from None
    if out.returncode != 0:
        msg = (out.stderr or out.stdout).strip().splitlines()
        reason = msg[-1] if msg else f"exit code {out.returncode}"
        raise ConfigError(f"SLURM refuses the request ({' '.join(shlex.quote(c) for c in cmd[2:-1])}): {reason}")


@dataclass
class TrainJob:
    """The callable submitit runs on every task. Calling it again after a requeue resumes the run."""

    config_file: str | None
    overrides: list[str]

    def __call__(self) -> dict:
        import submitit

        from ddppo.distributed import is_lost_peer
        from ddppo.trainer.loop import train

        cfg = load_config(self.config_file, self.overrides)
        env = submitit.JobEnvironment()
        try:
            result = train(cfg)
        except Exception as error:
            if env.num_tasks == 1 or not is_lost_peer(error):
                raise
            print(lost_peer_message(env.global_rank, Path(cfg.run_dir) / cfg.name, error), file=sys.stderr, flush=True)
            # no result file: a waiting client (`ddppo slurm train --wait`) waits for the requeued job instead of
            # reporting this task's failure while the job goes on
            sys.exit(-1)
        if result.get("signal") == signal.SIGUSR1:
            if env.global_rank == 0:
                subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
            # no result file: submitit keeps waiting for the requeued job, which resumes the run
            sys.exit(-1)
        summary = {k: v for k, v in result.items() if k != "progress"}
        summary["rank"] = env.global_rank
        return summary


def lost_peer_message(rank: int, run_dir: Path, error: BaseException) -> str:
    """One line for the log of a task whose peers went away, e.g. with their node."""
    reason = re.sub(r"^\[[^\]]*\]\s*", "", str(error).strip().splitlines()[0]).split(". ")[0]  # no source location
    return (f"ddppo slurm: rank {rank} on {socket.gethostname()} lost the other workers ({reason}). If SLURM declares "
            f"their node failed, it requeues this job (--requeue), which resumes from the last resume state in "
            f"{run_dir}; otherwise see the other tasks' logs.")


@dataclass
class EvalJob:
    """``ddppo eval`` as a SLURM job. Evaluation is idempotent: on SIGUSR1 (time limit or preemption) rank 0
    requeues the job and it runs again from the start; SIGTERM ends it with code 0."""

    argv: list[str]

    def __call__(self) -> int:
        import submitit

        from ddppo.launch.arguments import parse
        from ddppo.launch.eval_command import run_eval

        env = submitit.JobEnvironment()

        def on_usr1(_signum, _frame):
            if env.global_rank == 0:
                subprocess.run(["scontrol", "requeue", str(env.job_id)], check=True, timeout=60)
            sys.exit(-1)  # no result file: submitit waits for the requeued run

        signal.signal(signal.SIGUSR1, on_usr1)
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
        code = run_eval(parse(["eval", *self.argv]))
        if code:
            raise RuntimeError(f"ddppo eval {' '.join(self.argv)} exited with code {code}")
        return code


def submit_eval(argv: list[str], *, tasks: int = 1, cpus_per_task: int = 2, gpus_per_node: int = 0,
                mem: str | None = None, time_limit: str = "4:00:00", partition: str | None = None,
                account: str | None = None, log_dir: str = "runs/slurm_logs", log=print):
    """Submit ``ddppo eval ARGV`` (episodes split over ``tasks`` ranks)."""
    import submitit

    check_request(partition, 1, tasks, cpus_per_task, gpus_per_node, mem, time_limit, account)
    executor = submitit.AutoExecutor(folder=str(Path(log_dir) / "%j"), cluster="slurm")
    hours, minutes = _minutes(time_limit)
    params = dict(nodes=1, tasks_per_node=tasks, cpus_per_task=cpus_per_task, timeout_min=hours * 60 + minutes,
                  name="ddppo-eval", slurm_additional_parameters=REQUEUE)
    for key, value in (("gpus_per_node", gpus_per_node), ("slurm_partition", partition),
                       ("slurm_account", account), ("slurm_mem", mem)):
        if value:
            params[key] = value
    executor.update_parameters(**params)
    job = executor.submit(EvalJob(list(argv)))
    log(f"submitted {job.job_id}: ddppo eval {' '.join(argv)}, logs {job.paths.stdout}")
    return job


def submit_train(config_file: str | None, overrides: list[str], sweep: list[str], *, nodes: int = 1,
                 gpus_per_node: int = 0, tasks_per_node: int | None = None, cpus_per_task: int = 2,
                 mem: str | None = None, time_limit: str = "72:00:00", partition: str | None = None,
                 account: str | None = None, max_parallel: int = 0, signal_delay_s: int = 90,
                 log_dir: str | None = None, log=print):
    """Validate every run's config and the resource request, then submit one job or one array job."""
    import submitit

    tasks = tasks_per_node or max(1, gpus_per_node)
    runs = []
    for combo in parse_sweep(sweep):
        base = load_config(config_file, overrides)  # fails here, before submitting, on a bad key or value
        require_backend(base)
        name = run_name(base.name, combo)
        cfg = load_config(config_file, [*overrides, *combo, f"name={name}"])
        runs.append(([*overrides, *combo, f"name={name}"], cfg))
    check_request(partition, nodes, tasks, cpus_per_task, gpus_per_node, mem, time_limit, account)
    folder = Path(log_dir or Path(runs[0][1].run_dir) / "slurm_logs") / "%j"
    executor = submitit.AutoExecutor(folder=str(folder), cluster="slurm")
    hours, minutes = _minutes(time_limit)
    params = dict(nodes=nodes, tasks_per_node=tasks, cpus_per_task=cpus_per_task, timeout_min=hours * 60 + minutes,
                  slurm_signal_delay_s=signal_delay_s, name=runs[0][1].name.split("/")[0],
                  slurm_additional_parameters=REQUEUE)
    if gpus_per_node:
        params["gpus_per_node"] = gpus_per_node
    if partition:
        params["slurm_partition"] = partition
    if account:
        params["slurm_account"] = account
    if mem:
        params["slurm_mem"] = mem
    if max_parallel:
        params["slurm_array_parallelism"] = max_parallel
    executor.update_parameters(**params)
    if len(runs) == 1:
        jobs = [executor.submit(TrainJob(config_file, runs[0][0]))]
    else:
        with executor.batch():
            jobs = [executor.submit(TrainJob(config_file, ov)) for ov, _ in runs]
    for job, (_, cfg) in zip(jobs, runs):
        log(f"submitted {job.job_id}: run {Path(cfg.run_dir) / cfg.name}, logs {job.paths.stdout}")
    return jobs


def _minutes(time_limit: str) -> tuple[int, int]:
    """SLURM's [D-]HH:MM[:SS] or minutes -> (hours, minutes)."""
    try:
        days, _, rest = time_limit.rpartition("-")
        parts = [int(p) for p in rest.split(":")]
        if len(parts) == 1:
            total = parts[0]
        else:
            total = parts[0] * 60 + parts[1] + (1 if len(parts) > 2 and parts[2] else 0)
        total += int(days or 0) * 24 * 60
    except ValueError:
        raise ConfigError(f"--time {time_limit!r} is not [D-]HH:MM[:SS] or minutes") from None
    return divmod(total, 60)
