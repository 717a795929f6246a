"""DD-PPO across two hosts for real: two network namespaces joined by a veth pair (slurm/two-hosts.sh), each with its
own host name and address, sharing this machine's file system as cluster nodes share a network file system.

- torchrun --nnodes 2 (c10d rendezvous on the first host's address): gradients identical on both ranks after an
  update and equal to one process's on the concatenated batch; the trainer trains, checkpoints and resumes; straggler
  preemption cuts the slow host's rollouts; a lost host (every process of its namespace SIGKILLed) is replaced by a
  new torchrun there, the survivor's agent takes it into its restarted group, and the run resumes;
- a two-node SLURM cluster (slurm/local-cluster.sh start --nodes 2): `ddppo slurm train --nodes 2 --gpus-per-node 0`
  and slurm/multi_node.sbatch run one task per node to the end; a lost node makes SLURM requeue the job, which
  resumes when the node is back.

The only link between the hosts is the veth pair, so every collective that completes went over it: Gloo finds the
address to bind to by resolving the host's name (each host's /etc/hosts names both), or takes GLOO_SOCKET_IFNAME.
Traffic goes only to the two addresses the fixture made. Everything the tests start runs inside the two namespaces,
and the fixture kills it and removes them at the end, also when a test fails.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from system_support import lacking, need
from test_distributed import reference_update
from test_faults import assert_run_dir_sound, saved_update, tb_steps
from tiny import tiny

from ddppo.io import checkpoint

ROOT = Path(__file__).resolve().parent.parent
HELPERS = Path(__file__).resolve().parent / "helpers"
TWO_HOSTS = ROOT / "slurm" / "two-hosts.sh"
CLUSTER = ROOT / "slurm" / "local-cluster.sh"
TORCHRUN = Path(sys.executable).with_name("torchrun")
DDPPO = Path(sys.executable).with_name("ddppo")
LONG = os.environ.get("DDPPO_LONG_TESTS") == "1"
IFACE = "veth0"
NUM_ENVS, NUM_STEPS = 2, 8
PER_UPDATE = 2 * NUM_ENVS * NUM_STEPS  # env steps of one update of both ranks
TINY = tiny(NUM_ENVS, NUM_STEPS, "log_interval=1", "task.max_episode_steps=50")
RUN_TIMEOUT = 300  # seconds for any one launch; a tiny two-host run takes 15-60 s on 2 busy cores

pytestmark = [pytest.mark.distributed, pytest.mark.timeout(900)]


def _why_no_namespaces() -> str | None:
    if os.geteuid() != 0:
        return "needs root: network namespaces and veth pairs"
    for tool in ("ip", "nsenter", "unshare"):
        if shutil.which(tool) is None:
            return f"needs {tool} (iproute2, util-linux)"
    if subprocess.run(["ip", "netns", "list"], capture_output=True).returncode != 0:
        return "`ip netns` is unavailable here"
    return None




@pytest.fixture(autouse=True, scope="module")
def namespaces():
    """Every test here runs two hosts in network namespaces: skip (fail under DDPPO_REQUIRE_SYSTEM) without them."""
    need(_why_no_namespaces())


HOSTS, ADDRS = zip(*(line.split() for line in subprocess.run(
    [str(TWO_HOSTS), "list"], capture_output=True, text=True, check=True).stdout.splitlines()))


def two_hosts(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(TWO_HOSTS), *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hosts():
    """The two hosts, for this module only: one test session at a time holds them (a lock file), and they are
    removed at the end, whatever happened."""
    with open("/run/lock/ddppo-two-hosts.lock", "w") as lock:
        deadline = time.monotonic() + 900
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                assert time.monotonic() < deadline, "another test session held the two hosts for 15 minutes"
                time.sleep(1)
        two_hosts("down")  # what a killed session may have left
        up = two_hosts("up")
        assert up.returncode == 0, up.stderr
        try:
            yield HOSTS
        finally:
            down = two_hosts("down", timeout=120)
            assert down.returncode == 0, down.stderr


@pytest.fixture
def clean_hosts(hosts):
    """Whatever a test started on the hosts is SIGKILLed after it (the SLURM daemons too: `cluster` restarts them)."""
    yield hosts
    for host in hosts:
        two_hosts("kill", host)


@pytest.fixture(scope="module")
def data_dir(two_scene_dataset) -> Path:
    return two_scene_dataset


def overrides(data_dir: Path, run_root: Path, name: str, updates: int, *extra: str) -> list[str]:
    return [*TINY, f"task.data_dir={data_dir}", f"run_dir={run_root}", f"name={name}",
            f"total_steps={updates * PER_UPDATE}", "checkpoint_interval=2", *extra]


def host_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "GLOO_SOCKET_IFNAME"):
        env.pop(key, None)
    env.update(extra)
    return env


def start_on(host: str, cmd: list[str], log: Path, **env: str) -> subprocess.Popen:
    """CMD on HOST, output to LOG; the process is the command itself (two-hosts.sh execs it)."""
    with log.open("w") as out:
        return subprocess.Popen([str(TWO_HOSTS), "exec", host, *cmd], cwd=ROOT, env=host_env(**env), stdout=out,
                                stderr=subprocess.STDOUT)


def run_on(host: str, cmd: list[str], timeout: float = 60, **env: str) -> str:
    out = subprocess.run([str(TWO_HOSTS), "exec", host, *cmd], cwd=ROOT, env=host_env(**env), capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, f"{cmd} on {host}: rc {out.returncode}\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}"
    return out.stdout


def torchrun(port: int, run_id: str, args: list[str], max_restarts: int = 0) -> list[str]:
    """The same torchrun command on every node: the rendezvous is hosted by whichever node's agent owns the
    endpoint's address (the first host's)."""
    return [str(TORCHRUN), "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
            f"--rdzv-endpoint={ADDRS[0]}:{port}", f"--rdzv-id={run_id}", f"--max-restarts={max_restarts}",
            "--rdzv-conf=join_timeout=240", *args]


def wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = RUN_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{log.name}: still running after {timeout} s:\n{log.read_text()[-3000:]}") from None
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, f"{log.name}: rc {proc.returncode}\n{log.read_text()[-4000:]}"


def on_both(tmp_path: Path, port: int, run_id: str, args: list[str], tag: str, **env: str) -> list[Path]:
    logs = [tmp_path / f"{tag}_{host}.log" for host in HOSTS]
    procs = [start_on(host, torchrun(port, run_id, args), log, **env) for host, log in zip(HOSTS, logs)]
    wait_all(procs, logs)
    return logs


def wait_until(condition, timeout: float, what: str, poll: float = 0.2, running: dict | None = None):
    """Poll ``condition`` until it holds; fail after ``timeout`` or as soon as a process of ``running`` (log ->
    process) has exited."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        for log, proc in (running or {}).items():
            assert proc.poll() is None, f"{log.name}: exited (rc {proc.returncode}) before {what}:\n" + \
                log.read_text()[-3000:]
        assert time.monotonic() < deadline, f"no {what} within {timeout} s"
        time.sleep(poll)


def saved_since(run_dir: Path, t0: float) -> bool:
    """A resume state was written after ``t0`` (time.time()): the group running since then has made progress."""
    try:
        return (run_dir / "resume.pt").stat().st_mtime > t0 and saved_update(run_dir) >= 2
    except FileNotFoundError:
        return False


def rank_dumps(dump: Path) -> tuple[list[dict], list[dict]]:
    infos = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    states = [torch.load(dump / f"rank{r}_policy.pt", weights_only=True) for r in range(2)]
    return infos, states


def assert_same_state(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


# ---------------------------------------------------------------------------------------------- the hosts
def test_each_host_has_its_own_name_and_address_and_shares_the_files(clean_hosts, tmp_path):
    shared = tmp_path / "written_here.txt"
    shared.write_text("seen")
    for host, addr in zip(HOSTS, ADDRS):
        out = run_on(host, ["sh", "-c", f"hostname; getent hosts {' '.join(HOSTS)}; ip -o -4 addr show; cat {shared}"])
        lines = out.splitlines()
        assert lines[0] == host
        assert [line.split() for line in lines[1:3]] == [[a, h] for a, h in zip(ADDRS, HOSTS)]
        addresses = re.findall(r"^\d+: (\S+)\s+inet (\S+)", out, re.M)
        assert addresses == [("lo", "127.0.0.1/8"), (IFACE, f"{addr}/30")], out  # no other network
        assert lines[-1] == "seen"


# ---------------------------------------------------------------------------------------------- torchrun
def test_gradients_identical_on_both_hosts_after_an_update(clean_hosts, tmp_path):
    """tests/helpers/dist_grad_check.py across the hosts, Gloo told its interface (GLOO_SOCKET_IFNAME): the
    all-reduced gradients and the weights after the step are bit-identical on both ranks and equal the update of one
    process on the concatenated batch."""
    out = tmp_path / "grads"
    on_both(tmp_path, 29410, "grads", [str(HELPERS / "dist_grad_check.py"), str(out)], "grads",
            GLOO_SOCKET_IFNAME=IFACE)
    d0, d1 = (torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert d0["world_size"] == d1["world_size"] == 2
    assert_same_state(d0["reduced_grads"], d1["reduced_grads"], "all-reduced gradients")
    assert_same_state(d0["final_state"], d1["final_state"], "weights after the step")
    assert any(not torch.equal(d0["local_grads"][k], d1["local_grads"][k]) for k in d0["local_grads"])
    ref_grads, ref_state, n_valid = reference_update([d0, d1])
    assert n_valid == d0["n_global"]
    for k, g in ref_grads.items():
        torch.testing.assert_close(d0["reduced_grads"][k], g, rtol=1e-4, atol=1e-6)
    for k, v in ref_state.items():
        torch.testing.assert_close(d0["final_state"][k], v, rtol=1e-4, atol=1e-6)


def test_trainer_across_hosts_trains_and_resumes_after_a_restart(clean_hosts, data_dir, tmp_path):
    """ddppo's trainer on both hosts: 3 updates, then the same command with total_steps for 5 resumes at update 3.
    Gloo finds its address from the host name in the first launch and from GLOO_SOCKET_IFNAME in the second."""
    run_dir, dump = tmp_path / "runs" / "two", tmp_path / "dump"
    script = [str(HELPERS / "train_rank_dump.py")]
    on_both(tmp_path, 29420, "train1", [*script, *overrides(data_dir, tmp_path / "runs", "two", 3)], "first",
            DDPPO_TEST_DUMP=str(dump))
    infos, states = rank_dumps(dump)
    assert [i["rc"] for i in infos] == [0, 0]
    assert_same_state(states[0], states[1], "rank 0 vs rank 1 after 3 updates")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == 3 and summary["env_steps"] == 3 * PER_UPDATE
    assert summary["torch_threads_per_rank"] == [1, 1]  # two ranks reported
    assert sorted(p.name for p in run_dir.glob("resume_rank1*.pt")) == ["resume_rank1.u0000002.pt",
                                                                        "resume_rank1.u0000003.pt"]

    logs = on_both(tmp_path, 29421, "train2", [*script, *overrides(data_dir, tmp_path / "runs", "two", 5)], "second",
                   DDPPO_TEST_DUMP=str(dump), GLOO_SOCKET_IFNAME=IFACE)
    assert f"resumed {run_dir} at update 3" in logs[0].read_text()
    infos, states = rank_dumps(dump)
    assert_same_state(states[0], states[1], "rank 0 vs rank 1 after the resumed run")
    summary = json.loads((run_dir / "summary.json").read_text())
    assert (summary["resumed_from_update"], summary["updates"]) == (3, 5)
    assert tb_steps(run_dir, "loss/value") == [u * PER_UPDATE for u in range(1, 6)]
    assert_run_dir_sound(run_dir, ranks=2)


def test_straggler_preemption_across_hosts(clean_hosts, data_dir, tmp_path):
    """The second host's rank sleeps 0.1 s per step; with sync_frac 0.5 the first host finishing preempts it once it
    has 25% of its steps (the counter lives in the first host's TCPStore)."""
    dump = tmp_path / "dump"
    ov = overrides(data_dir, tmp_path / "runs", "slow", 4, "ddppo.slowdown=0.1", "ddppo.slow_rank=1",
                   "ddppo.sync_frac=0.5", "ddppo.preemption=true")
    on_both(tmp_path, 29430, "slow", [str(HELPERS / "train_rank_dump.py"), *ov], "slow", DDPPO_TEST_DUMP=str(dump))
    infos, states = rank_dumps(dump)
    fast, slow = infos[0]["rollout_lengths"], infos[1]["rollout_lengths"]
    assert len(fast) == len(slow) > 4  # cut rollouts: more updates to reach total_steps
    assert fast[1:] == [NUM_STEPS] * (len(fast) - 1), f"the fast host's rank must not be cut: {fast}"
    assert all(int(0.25 * NUM_STEPS) <= s < NUM_STEPS for s in slow[1:]), f"the slow host's rollouts: {slow}"
    assert_same_state(states[0], states[1], "rank 0 vs rank 1 with preemption")


@pytest.mark.slow
def test_lost_host_is_replaced_and_the_run_resumes(clean_hosts, data_dir, tmp_path):
    """Every process of the second host is SIGKILLed mid-run (its torchrun agent and its rank): the first host's rank
    fails in its next collective, its agent restarts it (--max-restarts) and waits in the rendezvous; a new torchrun
    on the second host (the replaced machine) joins, and the group resumes from the last resume state. Step counters
    go on, TensorBoard has one point per update, and everything on disk loads. DDPPO_LONG_TESTS=1 loses the host
    twice.

    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 on both: with torchrun's default (the agent's store shared with the
    workers), a new agent can never join a running group (it waits for the bootstrap address the old rank-0 agent
    does not write again; pytorch/pytorch#135712), and the whole job must be restarted instead."""
    losses = 2 if LONG else 1
    updates = 40 * (losses + 1)
    run_dir = tmp_path / "runs" / "lost"
    cmd = torchrun(29440, "lost", [str(ROOT / "ddppo" / "train.py"),
                                   *overrides(data_dir, tmp_path / "runs", "lost", updates)], max_restarts=losses)
    env = {"TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1", "LOGLEVEL": "INFO"}  # INFO: the agents' rendezvous in the logs
    first_log, second_log = tmp_path / "first.log", tmp_path / "second0.log"
    first = start_on(HOSTS[0], cmd, first_log, **env)
    second = start_on(HOSTS[1], cmd, second_log, **env)
    kill_saved, restarted = [], time.time()
    for loss in range(1, losses + 1):
        wait_until(lambda t=restarted: saved_since(run_dir, t), RUN_TIMEOUT, "resume state of the running group",
                   running={first_log: first, second_log: second})
        kill_saved.append(saved_update(run_dir))
        assert kill_saved[-1] < updates - 10, "the run is nearly over before the host is lost: make it longer"
        assert two_hosts("kill", HOSTS[1]).returncode == 0
        second.wait(timeout=30)
        wait_until(lambda n=loss: first_log.read_text().count("failed (exitcode") >= n, 120, "the survivor's failure",
                   running={first_log: first})  # the survivor's agent restarts its worker and waits for the group
        second_log = tmp_path / f"second{loss}.log"
        second, restarted = start_on(HOSTS[1], cmd, second_log, **env), time.time()
    wait_all([first, second], [first_log, second_log])

    text = first_log.read_text()
    resumed = [int(u) for u in re.findall(rf"resumed {re.escape(str(run_dir))} at update (\d+)", text)]
    assert len(resumed) == losses and all(k <= r for k, r in zip(kill_saved, resumed)), (kill_saved, resumed)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == updates and summary["env_steps"] == updates * PER_UPDATE
    assert summary["resumed_from_update"] == resumed[-1]
    assert tb_steps(run_dir, "loss/value") == [u * PER_UPDATE for u in range(1, updates + 1)]
    assert_run_dir_sound(run_dir, ranks=2)


@pytest.mark.slow
def test_lost_rendezvous_host_stops_the_job_and_running_it_again_resumes(clean_hosts, data_dir, tmp_path):
    """The first host holds the c10d rendezvous (the --rdzv-endpoint's address): when it is lost, the second host's
    torchrun stops too, whatever --max-restarts says. The same command on both hosts then resumes the run."""
    updates = 80
    run_dir = tmp_path / "runs" / "rdzv"
    cmd = torchrun(29450, "rdzv", [str(ROOT / "ddppo" / "train.py"),
                                   *overrides(data_dir, tmp_path / "runs", "rdzv", updates)], max_restarts=1)
    first_log, second_log = tmp_path / "first.log", tmp_path / "second.log"
    first = start_on(HOSTS[0], cmd, first_log)
    second = start_on(HOSTS[1], cmd, second_log)
    wait_until(lambda: saved_update(run_dir) >= 2, RUN_TIMEOUT, "first resume state",
               running={first_log: first, second_log: second})
    before_kill = saved_update(run_dir)
    assert before_kill < updates - 10, "the run is nearly over before the host is lost: make it longer"
    assert two_hosts("kill", HOSTS[0]).returncode == 0
    first.wait(timeout=30)
    assert second.wait(timeout=120) != 0
    assert "RendezvousConnectionError" in second_log.read_text(), second_log.read_text()[-3000:]

    logs = on_both(tmp_path, 29451, "rdzv2", cmd[cmd.index(str(ROOT / "ddppo" / "train.py")):], "again")
    resumed = int(re.findall(rf"resumed {re.escape(str(run_dir))} at update (\d+)", logs[0].read_text())[0])
    assert before_kill <= resumed < updates
    assert tb_steps(run_dir, "loss/value") == [u * PER_UPDATE for u in range(1, updates + 1)]
    assert_run_dir_sound(run_dir, ranks=2)


@pytest.mark.slow
def test_gloo_needs_an_interface_when_host_names_resolve_to_loopback(clean_hosts, tmp_path):
    """With each host's own name resolving to 127.0.1.1 (the Debian/Ubuntu /etc/hosts default), Gloo binds to
    loopback and tells the other host that address: the two cannot connect. GLOO_SOCKET_IFNAME=veth0 makes the same
    all-reduce work."""
    script = ("import datetime, torch, torch.distributed as dist; "
              "dist.init_process_group('gloo', timeout=datetime.timedelta(seconds=20)); "
              "t = torch.ones(1); dist.all_reduce(t); print('sum', t.item())")
    hosts_files = [Path("/etc/netns") / host / "hosts" for host in HOSTS]
    saved = [f.read_text() for f in hosts_files]
    try:
        for f, host, addr in zip(hosts_files, HOSTS, ADDRS):
            f.write_text(f.read_text().replace(f"{addr} {host}\n", f"127.0.1.1 {host}\n"))
        for port, env in ((29460, {}), (29461, {"GLOO_SOCKET_IFNAME": IFACE})):
            logs = [tmp_path / f"{port}_{host}.log" for host in HOSTS]
            procs = [start_on(host, [sys.executable, "-c", script], log, MASTER_ADDR=ADDRS[0], MASTER_PORT=str(port),
                              RANK=str(rank), WORLD_SIZE="2", **env)
                     for rank, (host, log) in enumerate(zip(HOSTS, logs))]
            for proc in procs:
                proc.wait(timeout=120)
            texts = [log.read_text() for log in logs]
            if env:
                assert [p.returncode for p in procs] == [0, 0] and all("sum 2.0" in t for t in texts), texts
            else:
                assert any("remote=[127.0.1.1]" in t for t in texts), texts
                assert all(p.returncode != 0 for p in procs), texts
    finally:
        for f, text in zip(hosts_files, saved):
            f.write_text(text)


# ---------------------------------------------------------------------------------------------- SLURM
@pytest.fixture
def cluster(clean_hosts):
    """The two-node SLURM cluster on the hosts: slurmctld on the first, a slurmd on each (started again if a test
    killed them)."""
    out = subprocess.run([str(CLUSTER), "start", "--nodes", "2"], capture_output=True, text=True, timeout=300)
    if out.returncode != 0 and shutil.which("slurmctld") is None:
        lacking(f"no SLURM here and none could be installed: {out.stderr.strip()[-300:]}")
    assert out.returncode == 0, out.stdout + out.stderr
    yield clean_hosts
    # No job of this test outlives it: cancelled, gone from the queue, and the controller stopped with SIGTERM so
    # that it saves that state (a SIGKILLed controller recovers what it last saved, and ran a cancelled job again).
    subprocess.run([str(TWO_HOSTS), "exec", HOSTS[0], "scancel", "--user", "root"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and subprocess.run(
            [str(TWO_HOSTS), "exec", HOSTS[0], "squeue", "-h"], capture_output=True, text=True, timeout=60).stdout:
        time.sleep(1)
    subprocess.run([str(CLUSTER), "stop", "--nodes", "2"], capture_output=True, timeout=60)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and {"slurmctld", "slurmd"} & set(process_names(HOSTS)):
        time.sleep(0.5)


def process_names(hosts) -> list[str]:
    """The names of the processes running on the hosts."""
    pids = [pid for host in hosts for pid in subprocess.run(["ip", "netns", "pids", host], capture_output=True,
                                                             text=True).stdout.split()]
    names = []
    for pid in pids:
        try:
            names.append(Path(f"/proc/{pid}/comm").read_text().strip())
        except OSError:  # gone meanwhile
            pass
    return names


def slurm(*cmd: str, timeout: float = 60) -> str:
    """A SLURM command on the first host, where the two-node cluster's configuration is /etc/slurm."""
    return run_on(HOSTS[0], list(cmd), timeout=timeout).strip()


def job_state(job_id: str) -> str:
    fields = dict(re.findall(r"(\w+)=(\S+)", slurm("scontrol", "show", "job", job_id)))
    return f"{fields['JobState']} {fields['Reason']}"


def requeued(job_id: str) -> bool:
    state = job_state(job_id)
    assert not state.startswith(("FAILED", "NODE_FAIL", "CANCELLED", "COMPLETED")), f"job {job_id}: {state}"
    return state.startswith("PENDING")


def submit_two_nodes(data_dir: Path, run_root: Path, name: str, updates: int, log: Path) -> subprocess.Popen:
    """`ddppo slurm train --nodes 2 --gpus-per-node 0 --wait` on the first host, as a user on a login node."""
    cmd = [str(DDPPO), "slurm", "train", "--nodes", "2", "--gpus-per-node", "0", "--cpus-per-task", "1",
           "--time", "10", "--signal-delay", "30", "--wait", *overrides(data_dir, run_root, name, updates)]
    return start_on(HOSTS[0], cmd, log)


def submitit_results(log: Path) -> list[dict]:
    """The result of every task, as `--wait` printed it."""
    lines = [line for line in log.read_text().splitlines() if line.startswith('{"job_id"')]
    assert len(lines) == 1, log.read_text()[-4000:]
    return json.loads(lines[0])["results"]


def assert_one_task_per_host(log_dir: Path) -> None:
    """submitit's log of each task names its host: rank r ran on host r."""
    for rank, host in enumerate(HOSTS):
        (log,) = log_dir.glob(f"*_{rank}_log.out")
        assert f"hostname={host}" in log.read_text() and f"global_rank={rank}(2)" in log.read_text(), log.read_text()


def test_slurm_train_runs_one_task_per_node(cluster, data_dir, tmp_path):
    log = tmp_path / "submit.log"
    proc = submit_two_nodes(data_dir, tmp_path / "runs", "s2", 4, log)
    wait_all([proc], [log])
    results = submitit_results(log)
    assert sorted(r["rank"] for r in results) == [0, 1]
    assert results[0]["param_checksum"] == results[1]["param_checksum"]
    assert all(r["env_steps"] == 4 * PER_UPDATE for r in results)  # both ranks' samples count
    (job_id,) = re.findall(r"submitted (\d+)", log.read_text())
    assert_one_task_per_host(tmp_path / "runs" / "slurm_logs" / job_id)


def submit_template(data_dir: Path, run_root: Path, name: str, updates: int) -> str:
    """slurm/multi_node.sbatch on the first host, asking for CPU tasks (it asks for 8 nodes x 8 GPUs)."""
    logs = run_root / "slurm_logs"
    logs.mkdir(parents=True, exist_ok=True)
    sbatch = ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=0", "--cpus-per-task=1",
              "--mem=1G", "--time=10", f"--chdir={ROOT}", f"--output={logs}/%j.out"]
    return run_on(HOSTS[0], [*sbatch, str(ROOT / "slurm" / "multi_node.sbatch"),
                             *overrides(data_dir, run_root, name, updates)],
                  CONFIG=str(ROOT / "configs" / "quickstart.yaml")).strip()


def job_gone(job_id: str) -> bool:
    return slurm("squeue", "-h", "-j", job_id) == ""


def test_multi_node_sbatch_template_runs_one_task_per_node(cluster, data_dir, tmp_path):
    job_id = submit_template(data_dir, tmp_path / "runs", "tpl", 4)
    wait_until(lambda: job_gone(job_id), RUN_TIMEOUT, f"end of job {job_id}", poll=1)
    fields = dict(re.findall(r"(\w+)=(\S+)", slurm("scontrol", "show", "job", job_id)))
    out = (tmp_path / "runs" / "slurm_logs" / f"{job_id}.out").read_text()
    assert (fields["JobState"], fields["ExitCode"]) == ("COMPLETED", "0:0"), out[-4000:]
    assert fields["NodeList"] == "ddppo-n[1-2]"
    run_dir = tmp_path / "runs" / "tpl"
    assert checkpoint.load(run_dir / "resume.pt")["state"]["env_steps"] == 4 * PER_UPDATE
    assert_run_dir_sound(run_dir, ranks=2)


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["ddppo slurm train", "multi_node.sbatch"])
def test_lost_node_requeues_the_slurm_job_which_resumes(cluster, data_dir, tmp_path, launcher):
    """Every process of the second node is SIGKILLed mid-run (munged, slurmd, the task). SLURM declares the node
    down (SlurmdTimeout, 10 s on this cluster) and requeues the job (it asked with --requeue; this cluster does not
    requeue jobs that do not ask). Under `ddppo slurm train` the task that survived says in one line what happened and
    leaves no result, so the user's `--wait` goes on waiting. Once the node is back and SLURM's hold on requeued jobs
    is over, the job starts again, resumes from the last resume state and runs to the end: step counters continue,
    TensorBoard has one point per update, everything on disk loads. DDPPO_LONG_TESTS=1 loses the node twice."""
    losses = 2 if LONG else 1
    updates = 60 * (losses + 1)
    run_root, log, proc = tmp_path / "runs", tmp_path / "submit.log", None
    run_dir = run_root / "lost"
    if launcher == "ddppo slurm train":
        proc = submit_two_nodes(data_dir, run_root, "lost", updates, log)
        job_id = wait_until(lambda: re.findall(r"submitted (\d+)", log.read_text()), 120, "job id")[0]
    else:
        job_id = submit_template(data_dir, run_root, "lost", updates)
    try:
        kill_saved, restarted = [], time.time()
        for loss in range(1, losses + 1):
            wait_until(lambda t=restarted: saved_since(run_dir, t), RUN_TIMEOUT, "resume state of the running job",
                       running={log: proc} if proc else None)
            kill_saved.append(saved_update(run_dir))
            assert kill_saved[-1] < updates - 10, "the run is nearly over before the node is lost: make it longer"
            assert two_hosts("kill", HOSTS[1]).returncode == 0
            wait_until(lambda: requeued(job_id), 120, f"requeue of job {job_id}", poll=1)
            if proc is not None:
                task0 = next((run_root / "slurm_logs" / job_id).glob("*_0_log.err")).read_text()
                said = [line for line in task0.splitlines() if line.startswith("ddppo slurm:")]
                assert len(said) == loss and "lost the other workers" in said[-1], task0[-3000:]
                assert proc.poll() is None, log.read_text()[-3000:]  # the user's --wait still waits
            # the node comes back; SLURM starts the job again once its hold on requeued jobs is over (20 s here,
            # AuthInfo's cred_expire: 120 s by default)
            subprocess.run([str(CLUSTER), "start", "--nodes", "2"], check=True, capture_output=True, timeout=120)
            restarted = time.time()
        if proc is not None:
            # the requeued job's whole second life (SLURM's hold, start, resume, the rest of the run): on 2 cores
            # shared with other test runs it took over 300 s once
            wait_all([proc], [log], timeout=2 * RUN_TIMEOUT)
        wait_until(lambda: job_gone(job_id), RUN_TIMEOUT, f"end of job {job_id}", poll=1)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
    if proc is not None:
        results = submitit_results(log)
        assert sorted(r["rank"] for r in results) == [0, 1]
        assert results[0]["param_checksum"] == results[1]["param_checksum"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["env_steps"] == updates * PER_UPDATE and summary["updates"] == updates
    assert summary["resumed_from_update"] >= kill_saved[-1]
    assert tb_steps(run_dir, "loss/value") == [u * PER_UPDATE for u in range(1, updates + 1)]
    assert_run_dir_sound(run_dir, ranks=2)
