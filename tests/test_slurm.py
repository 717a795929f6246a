"""SLURM through submitit, on a real single-node SLURM (slurm/local-cluster.sh start; .ci/run starts it)."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from system_support import need

from ddppo.config import ConfigError
from ddppo.io import checkpoint
from ddppo.launch.slurm import check_request, parse_sweep, submit_train

pytestmark = pytest.mark.timeout(600)

ROOT = Path(__file__).resolve().parent.parent


def _slurm_up() -> bool:
    if shutil.which("sinfo") is None:
        return False
    out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    return out.returncode == 0 and any(s in out.stdout for s in ("idle", "mix", "alloc"))


@pytest.fixture(scope="module")
def slurm_cluster():
    """A running SLURM cluster: skip (fail under DDPPO_REQUIRE_SYSTEM) without one."""
    need(None if _slurm_up() else "no SLURM cluster: run `slurm/local-cluster.sh start`")


needs_slurm = pytest.mark.usefixtures("slurm_cluster")


def tiny(tmp: Path, data: Path, total: int, **extra) -> list[str]:
    values = {
        "run_dir": str(tmp / "runs"), "task.data_dir": str(data), "total_steps": total, "eval_episodes": 0,
        "sim.resolution": 16, "policy.encoder": "simple_cnn", "policy.hidden_size": 16, "policy.base_planes": 4,
        "policy.rnn_type": "gru", "policy.num_recurrent_layers": 1, "ppo.num_envs": 2, "ppo.num_steps": 8,
        "ppo.num_mini_batch": 1, "ppo.ppo_epoch": 1, "log_interval": 1, "checkpoint_interval": 5,
        "dataset.scenes": "{train: 2, val: 1, test: 1}", "dataset.max_extent": 8.0,
        "dataset.episodes_per_scene": "{train: 10, val: 5, test: 5}",
    }
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    from ddppo.config import DatasetConfig
    from ddppo.sim.dataset_dir import generate_dataset

    out = tmp_path_factory.mktemp("slurm_data") / "data"
    generate_dataset(out, DatasetConfig(scenes={"train": 2, "val": 1, "test": 1}, max_extent=8.0,
                                        episodes_per_scene={"train": 10, "val": 5, "test": 5}), log=lambda *_: None)
    return out


def wait_state(job_id: str, states: tuple[str, ...], timeout: float = 120) -> str:
    t0 = time.time()
    while time.time() - t0 < timeout:
        out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if out in states:
            return out
        time.sleep(0.5)
    raise TimeoutError(f"job {job_id} never reached {states}")


def wait_for_file(path: Path, timeout: float = 180) -> None:
    t0 = time.time()
    while not path.is_file():
        assert time.time() - t0 < timeout, f"{path} was never written"
        time.sleep(0.2)


def test_sweep_parsing():
    assert parse_sweep(["a=1,2", "b=x,y"]) == [["a=1", "b=x"], ["a=1", "b=y"], ["a=2", "b=x"], ["a=2", "b=y"]]
    assert parse_sweep([]) == [[]]
    with pytest.raises(ConfigError, match="not key=v1,v2"):
        parse_sweep(["nonsense"])


@needs_slurm
def test_bad_partition_and_resources_fail_before_submitting(tmp_path, data):
    before = subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout
    with pytest.raises(ConfigError, match="SLURM refuses the request"):
        submit_train(None, tiny(tmp_path, data, 64), [], partition="no_such_partition", time_limit="5")
    with pytest.raises(ConfigError, match="SLURM refuses the request"):
        check_request(None, 1, 1, 512, 0, None, "5", None)  # more CPUs than the node has
    with pytest.raises(ConfigError, match="ppo.num_envs"):
        submit_train(None, [*tiny(tmp_path, data, 64), "ppo.num_envs=zero"], [], time_limit="5")
    assert subprocess.run(["squeue", "-h"], capture_output=True, text=True).stdout == before


@needs_slurm
def test_array_sweep_runs_each_element_in_its_own_run_dir(tmp_path, data):
    jobs = submit_train(None, tiny(tmp_path, data, 64, name="sweep"), ["ppo.lr=0.001,0.0005"], cpus_per_task=1,
                        time_limit="10", max_parallel=2, log=lambda *_: None)
    assert len(jobs) == 2 and all("_" in j.job_id for j in jobs)  # one array job, two elements
    results = [j.results()[0] for j in jobs]
    dirs = {r["run_dir"] for r in results}
    sweep = tmp_path / "runs" / "sweep"
    assert dirs == {str(sweep / "ppo.lr=0.001"), str(sweep / "ppo.lr=0.0005")}
    for r in results:
        assert r["env_steps"] >= 64
        assert list((Path(r["run_dir"]) / "tb").glob("events.out.tfevents.*"))
        assert checkpoint.list_checkpoints(Path(r["run_dir"]) / "checkpoints")


@needs_slurm
def test_two_task_job_trains_with_identical_parameters_on_both_ranks(tmp_path, data):
    (job,) = submit_train(None, tiny(tmp_path, data, 128, name="two"), [], tasks_per_node=2, cpus_per_task=1,
                          time_limit="10", log=lambda *_: None)
    results = job.results()
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert results[0]["param_checksum"] == results[1]["param_checksum"]
    assert results[0]["env_steps"] >= 128  # samples of both ranks count


@needs_slurm
def test_preemption_signal_saves_requeues_and_resumes(tmp_path, data):
    total = 16 * 150
    (job,) = submit_train(None, tiny(tmp_path, data, total, name="preempt"), [], cpus_per_task=1, time_limit="10",
                          log=lambda *_: None)
    run = tmp_path / "runs" / "preempt"
    wait_for_file(run / "resume.pt")
    saved_before = checkpoint.load(run / "resume.pt")["state"]["update"]
    subprocess.run(["scancel", "--signal=USR1", job.job_id], check=True)
    # SLURM holds a requeued job for ~2 minutes (Reason=BeginTime); release it at once to keep the test short
    wait_state(job.job_id, ("PENDING",))
    subprocess.run(["scontrol", "update", f"JobId={job.job_id}", "StartTime=now"], check=True)
    result = job.results()[0]  # submitit follows the requeued job to its end
    assert result["env_steps"] >= total
    assert result["resumed_from_update"] >= saved_before > 0
    final = checkpoint.load(run / "resume.pt")
    assert final["state"]["env_steps"] == result["env_steps"]
    log = Path(str(job.paths.stdout)).read_text()
    assert "received: saved resume state" in log and "resumed" in log


@needs_slurm
def test_sigterm_leaves_valid_resume_state_and_exit_code_zero(tmp_path, data):
    total = 16 * 100_000
    (job,) = submit_train(None, tiny(tmp_path, data, total, name="term"), [], cpus_per_task=1, time_limit="10",
                          log=lambda *_: None)
    run = tmp_path / "runs" / "term"
    wait_for_file(run / "resume.pt")
    subprocess.run(["scancel", "--signal=TERM", job.job_id], check=True)
    result = job.results()[0]
    assert result["signal"] == 15 and result["env_steps"] < total
    state = checkpoint.load(run / "resume.pt")
    assert state["state"]["env_steps"] == result["env_steps"]
    rank_state = run / f"resume_rank0.u{state['state']['update']:07d}.pt"
    assert torch.load(rank_state, weights_only=True)["envs"]["iterators"]
    t_end = time.time()
    while time.time() - t_end < 30:  # the job step ended by itself with code 0
        out = subprocess.run(["scontrol", "show", "job", job.job_id], capture_output=True, text=True).stdout
        if "JobState=COMPLETED" in out:
            break
        time.sleep(0.5)
    assert "JobState=COMPLETED" in out and "ExitCode=0:0" in out


@needs_slurm
@pytest.mark.parametrize("template", ["single_node.sbatch", "array.sbatch"])
def test_sbatch_templates_train_on_cpu_workers(tmp_path, data, template):
    """The plain sbatch templates (srun + ddppo/train.py), with CPU workers instead of GPUs."""
    (tmp_path / "runs" / "slurm_logs").mkdir(parents=True)
    overrides = tiny(tmp_path, data, 64, name="tpl")
    cmd = ["sbatch", "--parsable", "--gpus-per-node=0", "--cpus-per-task=1", "--mem=1G", "--time=10",
           f"--chdir={ROOT}", f"--output={tmp_path}/runs/slurm_logs/%j.out"]
    if template == "array.sbatch":
        sweep = tmp_path / "sweep.txt"
        sweep.write_text("name=tpl_a ppo.lr=0.001\nname=tpl_b ppo.lr=0.0005\n")
        cmd += ["--array=0-1", str(ROOT / "slurm" / template), str(sweep),
                *[o for o in overrides if not o.startswith("name=")]]
        names = ["tpl_a", "tpl_b"]
    else:
        cmd += ["--ntasks-per-node=2", str(ROOT / "slurm" / template), *overrides]
        names = ["tpl"]
    job_id = subprocess.run(cmd, capture_output=True, text=True, check=True,
                            env={**__import__("os").environ, "CONFIG": str(ROOT / "configs/quickstart.yaml")}
                            ).stdout.strip().split(";")[0]
    t0 = time.time()
    while subprocess.run(["squeue", "-h", "-j", job_id], capture_output=True, text=True).stdout.strip():
        assert time.time() - t0 < 300, "sbatch job did not finish"
        time.sleep(1)
    for name in names:
        state = checkpoint.load(tmp_path / "runs" / name / "resume.pt")["state"]
        assert state["env_steps"] >= 64, (tmp_path / "runs" / "slurm_logs").glob("*.out")


@needs_slurm
def test_slurm_eval_job_writes_the_summary(tmp_path, data):
    from ddppo.config import load_config
    from ddppo.launch.slurm import submit_eval
    from ddppo.trainer.loop import train

    train(load_config(None, tiny(tmp_path, data, 32, name="to_eval")), log=lambda *_: None, show_progress=False)
    ckpt = sorted((tmp_path / "runs" / "to_eval" / "checkpoints").glob("ckpt_*.pt"))[-1]
    out = tmp_path / "eval_out"
    job = submit_eval([str(ckpt), "--episodes", "4", "--agents", "oracle", "--out", str(out)], tasks=2,
                      cpus_per_task=1, time_limit="10",
                      log_dir=str(tmp_path / "logs"), log=lambda *_: None)
    job.results()
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert summary["checkpoint"]["episodes"] == 4 and summary["oracle"]["success"] == 1.0
