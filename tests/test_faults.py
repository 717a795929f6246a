"""Fault tolerance, each fault really injected: a rank killed with SIGKILL under torchrun, SIGTERM/SIGUSR1 at
random points, damaged resume files and checkpoints, a disk that fills up mid-write, NaN/Inf in the update,
determinism of the first updates, and a short soak.

Nothing of the trainer is replaced. Where a test wraps a trainer function it only observes it (records what it
saw, then calls the real one) or feeds it a faulty input (NaN values, a failing file write) at a chosen update.
Everything is tiny (16x16 depth, a small CNN, 2 envs x 8 steps per update) except the soak test.
"""

from __future__ import annotations

import copy
import errno
import json
import math
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from system_support import lacking
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tiny import quiet, tiny
from trainer_process import ddppo_command

import ddppo.io.atomic
import ddppo.train as train_script
import ddppo.trainer.loop as trainer
from ddppo.config import load_config
from ddppo.io import checkpoint
from ddppo.launch.cli import main as cli_main
from ddppo.sim.dataset_dir import generate_dataset

REPO = Path(__file__).resolve().parent.parent
LONG = os.environ.get("DDPPO_LONG_TESTS") == "1"  # longer forms of the signal and soak tests
NUM_ENVS, NUM_STEPS = 2, 8
PER_UPDATE = NUM_ENVS * NUM_STEPS
TINY = tiny(NUM_ENVS, NUM_STEPS, "task.max_episode_steps=50")


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fault_data") / "data"
    cfg = load_config(None, ["dataset.scenes={train: 2, val: 1, test: 1}",
                             "dataset.episodes_per_scene={train: 20, val: 5, test: 5}",
                             "dataset.min_extent=5", "dataset.max_extent=8"]).dataset
    generate_dataset(out, cfg, log=quiet)
    return out


def overrides(data_dir: Path, run_dir: Path, name: str, updates: int, *extra: str) -> list[str]:
    return [*TINY, f"task.data_dir={data_dir}", f"run_dir={run_dir}", f"name={name}",
            f"total_steps={updates * PER_UPDATE}", "log_interval=1", "checkpoint_interval=1", *extra]


def run(ov: list[str], fresh: bool = False) -> dict:
    return trainer.train(load_config(None, ov), fresh=fresh, log=quiet, show_progress=False)


def read_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    """tag -> {step: value}, as TensorBoard reads the whole tb/ directory (purged steps dropped)."""
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {ev.step: ev.value for ev in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def tb_steps(run_dir: Path, tag: str) -> list[int]:
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0})
    acc.Reload()
    return [ev.step for ev in acc.Scalars(tag)]


def assert_same_tensors(a: dict, b: dict, what: str) -> None:
    assert a.keys() == b.keys(), what
    for k in a:
        assert torch.equal(a[k], b[k]), f"{what}: {k} differs"


def shared_update(run_dir: Path, name: str = "resume.pt") -> int:
    return checkpoint.load(run_dir / name)["state"]["update"]


def assert_run_dir_sound(run_dir: Path, ranks: int = 1) -> None:
    """Everything a crash could have damaged loads: both resume sets with every rank's file, every checkpoint, and
    the TensorBoard events; no temporary file is left behind."""
    for name in ("resume.pt", "resume.prev.pt"):
        if (run_dir / name).is_file():
            update = shared_update(run_dir, name)
            for r in range(ranks):
                state = checkpoint.load(run_dir / f"resume_rank{r}.u{update:07d}.pt")
                assert state["update"] == update
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert ckpts, f"no checkpoint in {run_dir}"
    for p in ckpts:
        assert set(checkpoint.load(p)) >= {"policy", "config", "update", "env_steps"}, p
    assert read_scalars(run_dir)["loss/value"], "no TensorBoard scalars"
    assert not list(run_dir.rglob("*.tmp")), f"temporary files left: {list(run_dir.rglob('*.tmp'))}"


# ---------------------------------------------------------------------------------------------- processes
def clean_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    return env


def wait_for(condition, timeout: float, proc: subprocess.Popen, log: Path, what: str, poll: float = 0.05):
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        assert proc.poll() is None, f"exited (rc {proc.returncode}) before {what}:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()[-3000:]}"
        time.sleep(poll)


def saved_update(run_dir: Path) -> int:
    """The update of the newest complete resume state, -1 if none (resume.pt is replaced atomically)."""
    try:
        return shared_update(run_dir)
    except (FileNotFoundError, ValueError):
        return -1


def children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # field 4, after the parenthesised command
                out.append(int(entry.name))
    return out


def worker_ranks(agent_pid: int) -> dict[int, int]:
    """rank -> pid of the workers torchrun started (its child processes carrying RANK in their environment)."""
    ranks = {}
    for pid in children(agent_pid):
        try:
            environ = (Path("/proc") / str(pid) / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        for item in environ:
            if item.startswith(b"RANK="):
                ranks[int(item[5:])] = pid
    return ranks


# ---------------------------------------------------------------------------------------------- 1. kill -9
@pytest.mark.distributed
def test_kill_9_of_one_rank_restarts_the_group_which_resumes(data_dir, tmp_path):
    """torchrun --max-restarts=1, 2 Gloo ranks; once a resume state exists, rank 1 gets SIGKILL a seeded random
    moment later (most of an update is the rollout). The group restarts, resumes from the last resume state and
    ends at total_steps; counters continue; every checkpoint, resume file and TensorBoard event loads, and
    TensorBoard has exactly one point per update."""
    updates, per_update = 14, 2 * PER_UPDATE
    run_dir = tmp_path / "runs" / "kill"
    ov = [*TINY, f"task.data_dir={data_dir}", f"run_dir={tmp_path / 'runs'}", "name=kill", "ddppo.backend=gloo",
          f"total_steps={updates * per_update}", "log_interval=1", "checkpoint_interval=2"]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
           "--max-restarts=1", "ddppo/train.py", *ov]
    log = tmp_path / "torchrun.log"
    with log.open("w") as out:
        # torchrun's default: one store shared across restarts. ddppo.distributed gives each attempt its own key
        # space; without that, a restarted rank reads the dead attempt's Gloo address ("connectFullMesh failed").
        proc = subprocess.Popen(cmd, cwd=REPO, env=clean_env(), stdout=out,
                                stderr=subprocess.STDOUT)
        try:
            wait_for(lambda: saved_update(run_dir) >= 2, 240, proc, log, "first resume state")
            time.sleep(random.Random(1).uniform(0.0, 0.3))
            ranks = worker_ranks(proc.pid)
            assert set(ranks) == {0, 1}, f"workers of torchrun {proc.pid}: {ranks}"
            before_kill = saved_update(run_dir)
            assert before_kill < updates, "the run finished before the kill: make it longer"
            os.kill(ranks[1], signal.SIGKILL)
            rc = proc.wait(timeout=300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 0, text[-4000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    resumed = summary["resumed_from_update"]
    # the restarted group resumed from the resume state on disk at the kill (or the next one, written meanwhile)
    assert 2 <= before_kill <= resumed < updates and resumed % 2 == 0, (before_kill, resumed)
    assert f"resumed {run_dir} at update {resumed}" in text, text[-4000:]
    assert summary["updates"] == updates and summary["env_steps"] == updates * per_update
    assert_run_dir_sound(run_dir, ranks=2)
    # one point per update: the updates the killed group logged after its last save were purged and redone
    assert tb_steps(run_dir, "loss/value") == [u * per_update for u in range(1, updates + 1)]
    final = checkpoint.load(run_dir / "resume.pt")["state"]
    assert final["update"] == updates and final["env_steps"] == updates * per_update


# ---------------------------------------------------------------------------------------------- 2. signals
def watch_for_temporary(run_dir: Path, timeout: float) -> bool:
    """Poll until a checkpoint or resume file is being written (its temporary file exists)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            names = os.listdir(run_dir)
        except FileNotFoundError:
            names = []
        if any(n.endswith(".tmp") for n in names):
            return True
        time.sleep(0.0005)
    return False


def test_sigterm_and_sigusr1_at_random_points_then_the_same_command_finishes(data_dir, tmp_path, capsys):
    """`ddppo train`, interrupted three times (six with DDPPO_LONG_TESTS=1) by SIGTERM or SIGUSR1: at a seeded
    random moment of an update (rollout, learning or checkpoint writing: whatever is running), or while a resume
    file is being written.
    Each time: exit code 0 (SIGTERM) or 3 (SIGUSR1), a complete loadable resume state one update later at most, no
    temporary file. The same command then finishes the run at total_steps, and the result equals an
    uninterrupted run's bit for bit."""
    # a tiny update takes ~35 ms on a fast host, so an interruption lands up to ~15 updates after the resume state
    # it waits for: leave room for all of them before the run could finish (a signal after the end kills the process)
    total_updates = 200 if LONG else 100
    run_dir = tmp_path / "runs" / "sig"
    config = tmp_path / "tiny.yaml"
    config.write_text("name: sig\nlog_interval: 1\ncheckpoint_interval: 1\nkeep_checkpoints: 2\n")
    threads = f"num_threads={torch.get_num_threads()}"  # the same float arithmetic as the in-process run below
    base = [*TINY, f"task.data_dir={data_dir}", f"run_dir={tmp_path / 'runs'}", threads,
            f"total_steps={total_updates * PER_UPDATE}"]
    cmd = [*ddppo_command(), "train", "--config", str(config), *base]
    rng = random.Random(8)
    plan = [(signal.SIGTERM, "random"), (signal.SIGUSR1, "random"), (signal.SIGUSR1, "write")]
    if LONG:  # each interruption costs an interpreter start (~5 s): CI runs three
        plan += [(signal.SIGTERM, "write"), (signal.SIGUSR1, "random"), (signal.SIGTERM, "random")]
    last, hit_write = 0, 0
    for k, (sig, when) in enumerate(plan):
        log = tmp_path / f"run{k}.log"
        with log.open("w") as out:
            proc = subprocess.Popen(cmd, env=clean_env(), stdout=out, stderr=subprocess.STDOUT)
            try:
                # an update of THIS process has been saved: its signal handlers are installed
                wait_for(lambda last=last: saved_update(run_dir) > last, 180, proc, log, "a new resume state")
                if when == "random":
                    time.sleep(rng.uniform(0.0, 0.4))
                else:
                    hit_write += watch_for_temporary(run_dir, 20)
                proc.send_signal(sig)
                rc = proc.wait(timeout=120)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        text = log.read_text()
        assert rc == (0 if sig == signal.SIGTERM else trainer.EXIT_REQUEUE), f"{sig!r}, rc {rc}:\n{text[-3000:]}"
        assert f"signal {int(sig)} received" in text, text[-3000:]
        stopped = shared_update(run_dir)
        assert last < stopped < total_updates, (last, stopped)
        assert_run_dir_sound(run_dir)
        assert checkpoint.list_checkpoints(run_dir / "checkpoints")[-1].name == f"ckpt_{stopped:06d}.pt"
        last = stopped
    assert hit_write >= 1, "no signal landed while a resume file was being written"

    capsys.readouterr()
    assert cli_main(["train", "--config", str(config), *base]) == 0  # the same command, in this process
    assert f"resumed {run_dir} at update {last}" in capsys.readouterr().out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["updates"] == total_updates and summary["env_steps"] == total_updates * PER_UPDATE
    assert_run_dir_sound(run_dir)
    assert tb_steps(run_dir, "loss/value") == [u * PER_UPDATE for u in range(1, total_updates + 1)]

    trainer.train(load_config(config, [*base, f"run_dir={tmp_path / 'ref'}"]), log=quiet, show_progress=False)
    assert_same_tensors(checkpoint.load(run_dir / "resume.pt")["policy"],
                        checkpoint.load(tmp_path / "ref" / "sig" / "resume.pt")["policy"],
                        f"{len(plan)} interruptions + resume vs uninterrupted")


# ---------------------------------------------------------------------------------------------- 3. damaged files
@pytest.fixture(scope="module")
def reference_4(data_dir, tmp_path_factory) -> dict:
    """An uninterrupted 4-update run: what every recovered run below must end with."""
    root = tmp_path_factory.mktemp("ref4")
    run(overrides(data_dir, root, "ref", 4))
    return checkpoint.load(root / "ref" / "resume.pt")


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage":
        path.write_bytes(random.Random(0).randbytes(len(data)))
    elif how == "flip":  # one corrupted block in the middle: the zip's checksums must catch it
        mid = len(data) // 2
        path.write_bytes(data[:mid] + bytes(b ^ 0xFF for b in data[mid: mid + 64]) + data[mid + 64:])
    elif how == "delete":
        path.unlink()
    else:
        raise AssertionError(how)


@pytest.mark.parametrize("target, how", [
    ("shared", "truncate"), ("shared", "garbage"), ("shared", "flip"), ("rank", "truncate"), ("rank", "delete"),
])
def test_damaged_newest_resume_state_falls_back_to_the_previous_one(data_dir, tmp_path, capfd, reference_4,
                                                                     target, how):
    """Resume states after updates 1 and 2; the newest is damaged. The same command warns in one line naming the
    damaged file, resumes from update 1, and ends exactly where an uninterrupted run ends."""
    run(overrides(data_dir, tmp_path, "fb", 2))
    run_dir = tmp_path / "fb"
    assert (shared_update(run_dir), shared_update(run_dir, "resume.prev.pt")) == (2, 1)
    bad = run_dir / ("resume.pt" if target == "shared" else "resume_rank0.u0000002.pt")
    damage(bad, how)
    capfd.readouterr()
    result = run(overrides(data_dir, tmp_path, "fb", 4))
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert any(str(bad) in line for line in warnings), err
    assert result["resumed_from_update"] == 1 and result["updates"] == 4
    final = checkpoint.load(run_dir / "resume.pt")
    assert_same_tensors(final["policy"], reference_4["policy"], "fell back to update 1, then 3 more updates")
    # the damaged set was never promoted to "previous": now resume.pt = 4, resume.prev.pt = 3
    assert (final["state"]["update"], shared_update(run_dir, "resume.prev.pt")) == (4, 3)
    assert sorted(p.name for p in run_dir.glob("resume_rank0*.pt")) == \
        ["resume_rank0.u0000003.pt", "resume_rank0.u0000004.pt"]
    assert_run_dir_sound(run_dir)


def test_no_loadable_resume_state_is_one_clear_error(data_dir, tmp_path, capfd):
    run(overrides(data_dir, tmp_path, "both", 2))
    run_dir = tmp_path / "both"
    damage(run_dir / "resume.pt", "truncate")
    damage(run_dir / "resume_rank0.u0000001.pt", "garbage")
    capfd.readouterr()
    assert train_script.main(overrides(data_dir, tmp_path, "both", 4)) == 2  # `ddppo train` minus its default YAML
    err = capfd.readouterr().err
    error = [line for line in err.splitlines() if line.startswith("ddppo train: error:")]
    assert len(error) == 1 and "resume.pt" in error[0] and "resume.prev.pt" in error[0] and "--fresh" in error[0]
    assert str(run_dir / "resume.pt") in err and str(run_dir / "resume_rank0.u0000001.pt") in err  # the warnings
    assert "Traceback" not in err
    assert run(overrides(data_dir, tmp_path, "both", 2), fresh=True)["updates"] == 2


class FullDisk:
    """A file that takes ``room`` bytes, then fails like a full disk (ENOSPC). Everything else is the real file."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            self._f.write(bytes(memoryview(data).cast("B")[: self._room]))  # part of it reaches the disk
            self._room = 0
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._room -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._f.__exit__(*exc)

    def __getattr__(self, name):
        return getattr(self._f, name)


def fill_disk_when_writing(monkeypatch, prefix: str, at_update_file: str | None = None) -> dict:
    """From now on, the atomic write of a file whose name starts with ``prefix`` runs out of disk half-way."""
    real_fdopen = os.fdopen
    hits = {"n": 0}

    def fdopen(fd, *args, **kwargs):
        f = real_fdopen(fd, *args, **kwargs)
        name = Path(os.readlink(f"/proc/self/fd/{fd}")).name
        if name.startswith(f".{prefix}"):
            hits["n"] += 1
            return FullDisk(f, room=1000)
        return f

    monkeypatch.setattr(ddppo.io.atomic.os, "fdopen", fdopen)
    return hits


@pytest.mark.parametrize("prefix, resumes_at", [("resume.pt", 2), ("resume_rank0.u0000003", 2), ("ckpt_000003", 3)])
def test_full_disk_while_saving_keeps_the_old_files_and_resumes(data_dir, tmp_path, monkeypatch, capsys,
                                                                reference_4, prefix, resumes_at):
    """The disk fills up while update 3's rank file / resume file / checkpoint is written: `ddppo train` fails
    with one line naming the file and the errno; the older files are intact, no temporary file is left, and the
    same command (with room again) resumes from the newest complete resume state (update 2's; update 3's when
    only the checkpoint, written after it, failed) and ends exactly where an uninterrupted run ends."""
    ov = overrides(data_dir, tmp_path, "full", 2, "keep_checkpoints=5")
    run(ov)
    run_dir = tmp_path / "full"
    before = {p.name: p.read_bytes() for p in run_dir.glob("resume*.pt")}
    before_ckpts = {p.name: p.read_bytes() for p in checkpoint.list_checkpoints(run_dir / "checkpoints")}
    more = overrides(data_dir, tmp_path, "full", 4, "keep_checkpoints=5")
    with monkeypatch.context() as m:
        hits = fill_disk_when_writing(m, prefix)
        capsys.readouterr()
        assert train_script.main(more) == 2
    assert hits["n"] == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and prefix in err, err
    assert not list(run_dir.rglob("*.tmp")), "a failed write left its temporary file"
    for name, data in before_ckpts.items():
        assert (run_dir / "checkpoints" / name).read_bytes() == data, name
    assert (run_dir / "resume_rank0.u0000002.pt").read_bytes() == before["resume_rank0.u0000002.pt"]
    if resumes_at == 2:  # the newest complete resume state is still update 2's, byte for byte
        assert (run_dir / "resume.pt").read_bytes() == before["resume.pt"]
    assert shared_update(run_dir) == resumes_at

    result = run(more)
    assert result["resumed_from_update"] == resumes_at and result["updates"] == 4
    assert_same_tensors(checkpoint.load(run_dir / "resume.pt")["policy"], reference_4["policy"],
                        f"disk full at update 3, resumed from {resumes_at}")
    assert_run_dir_sound(run_dir)


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MiB tmpfs: a disk that really fills up (mounting needs root)."""
    if os.geteuid() != 0:
        lacking("a really full disk needs root, to mount a small tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        lacking(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=True)


def pages(path: Path) -> int:
    return -(-path.stat().st_size // PAGE)


PAGE = os.statvfs("/").f_frsize  # tmpfs counts whole pages of this size


def fill_disk(disk: Path, room_pages: int) -> Path:
    """A file that leaves ``room_pages`` pages of ``disk`` free."""
    st = os.statvfs(disk)
    filler = disk / "filler"
    with filler.open("wb") as f:
        f.write(bytes((st.f_bavail - room_pages) * st.f_frsize))
    assert os.statvfs(disk).f_bavail == room_pages
    return filler


@pytest.mark.parametrize("full_in", ["resume_rank0", "resume.pt", "ckpt"])
def test_really_full_disk_while_saving_keeps_the_old_files_and_resumes(data_dir, small_disk, capsys, reference_4,
                                                                       full_in):
    """The run directory on a 4 MiB tmpfs, filled (by another file) so that the next save runs out of room in its
    rank file, resume.pt or checkpoint: `ddppo train` stops with one line naming the file and "No space left on
    device"; no temporary file is left, the previous resume set and checkpoints are byte for byte what they were
    and load; with room again (the other file deleted) the same command resumes from the newest complete resume
    state and ends exactly where an uninterrupted run ends. Each time, the free room is a little less than the
    file needs and more than the rest of an update writes (TensorBoard's events, the saved config)."""
    first = 1 if full_in == "resume.pt" else 2  # resume.pt runs out only when no older set is freed before it
    run(overrides(data_dir, small_disk, "full", first, "keep_checkpoints=5"))
    run_dir = small_disk / "full"
    before = {p: p.read_bytes() for p in [*run_dir.glob("resume*.pt"), *(run_dir / "checkpoints").glob("*.pt")]}
    rank, ckpt = run_dir / f"resume_rank0.u{first:07d}.pt", run_dir / "checkpoints" / f"ckpt_{first:06d}.pt"
    failing, room = {
        "resume_rank0": (f"resume_rank0.u{first + 1:07d}.pt", pages(rank) - 1),
        "resume.pt": ("resume.pt", pages(rank) + pages(run_dir / "resume.pt") // 2),
        "ckpt": (f"ckpt_{first + 1:06d}.pt", pages(rank) + pages(ckpt) // 2),
    }[full_in]
    filler = fill_disk(small_disk, room)
    more = overrides(data_dir, small_disk, "full", 4, "keep_checkpoints=5")
    capsys.readouterr()
    assert train_script.main(more) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "No space left on device" in err and failing in err, err
    assert os.statvfs(small_disk).f_bavail <= room  # the disk was full: not a simulated failure
    assert not list(run_dir.rglob("*.tmp")), "a failed write left its temporary file"
    if full_in == "ckpt":  # update 3's resume set was complete before its checkpoint ran out: update 2's is previous
        before[run_dir / "resume.prev.pt"] = before.pop(run_dir / "resume.pt")
    for path, data in before.items():
        assert path.read_bytes() == data, path
    assert_run_dir_sound(run_dir)
    resumes_at = first + 1 if full_in == "ckpt" else first
    assert shared_update(run_dir) == resumes_at

    filler.unlink()
    result = run(more)
    assert result["resumed_from_update"] == resumes_at and result["updates"] == 4
    assert_same_tensors(checkpoint.load(run_dir / "resume.pt")["policy"], reference_4["policy"],
                        f"disk full in {failing}, resumed from {resumes_at}")
    assert_run_dir_sound(run_dir)


def test_eval_of_a_run_directory_skips_a_damaged_newest_checkpoint(data_dir, tmp_path, capsys):
    run(overrides(data_dir, tmp_path, "ev", 3))
    run_dir = tmp_path / "ev"
    ckpts = checkpoint.list_checkpoints(run_dir / "checkpoints")
    assert [p.name for p in ckpts] == ["ckpt_000001.pt", "ckpt_000002.pt", "ckpt_000003.pt"]
    damage(ckpts[-1], "truncate")
    warned = []
    assert checkpoint.latest(run_dir, warn=warned.append) == ckpts[1]
    assert checkpoint.latest(run_dir / "checkpoints", warn=warned.append) == ckpts[1]
    assert len(warned) == 2 and all(str(ckpts[-1]) in w for w in warned)
    assert checkpoint.latest(ckpts[0]) == ckpts[0]  # a file is taken as given

    capsys.readouterr()
    out = tmp_path / "eval"
    assert cli_main(["eval", str(run_dir), "--episodes", "2", "--num-envs", "2", "--agents", "",
                     "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert str(ckpts[-1]) in captured.err and "warning" in captured.err
    assert json.loads((out / "summary.json").read_text())["checkpoint"]["episodes"] == 2

    for p in ckpts[:2]:
        damage(p, "garbage")
    with pytest.raises(FileNotFoundError, match="no loadable checkpoint"):
        checkpoint.latest(run_dir, warn=quiet)


# ---------------------------------------------------------------------------------------------- 5. NaN / Inf
class UpdateRecorder:
    """Wraps ddppo.trainer.loop.ppo_update to observe it: the policy and optimiser state before and after each call and
    what it returned. ``fault(update)`` may return a fault to apply during that (1-based) update."""

    def __init__(self, monkeypatch, fault=lambda update: None):
        self.before, self.after, self.returned = [], [], []
        self.fault = fault
        self.update = 0
        real = trainer.ppo_update

        def ppo_update(policy, optimizer, *args, **kwargs):
            self.update += 1
            self.before.append(self._snapshot(policy, optimizer))
            undo = self.fault(self.update, policy)
            try:
                out = real(policy, optimizer, *args, **kwargs)
            finally:
                if undo:
                    undo()
            self.after.append(self._snapshot(policy, optimizer))
            self.returned.append(out)
            return out

        monkeypatch.setattr(trainer, "ppo_update", ppo_update)

    @staticmethod
    def _snapshot(policy, optimizer) -> tuple[dict, dict]:
        return ({k: v.detach().clone() for k, v in policy.state_dict().items()},
                copy.deepcopy(optimizer.state_dict()))


def nan_values(policy):
    """The policy's value head returns NaN during this update (the loss is NaN)."""
    real = policy.evaluate_actions

    def evaluate_actions(*args, **kwargs):
        log_probs, values, entropy = real(*args, **kwargs)
        return log_probs, values * float("nan"), entropy

    policy.evaluate_actions = evaluate_actions
    return lambda: delattr(policy, "evaluate_actions")


def nan_observations(policy):
    """The depth frames of the rollout hold NaN (a broken sensor): the real policy runs on them, its visual
    normaliser folds them into its running statistics, its logits become NaN."""
    real = policy.evaluate_actions

    def evaluate_actions(obs, *args, **kwargs):
        obs = dict(obs, depth=torch.full_like(obs["depth"], float("nan")))
        return real(obs, *args, **kwargs)

    policy.evaluate_actions = evaluate_actions
    return lambda: delattr(policy, "evaluate_actions")


def inf_gradient(policy):
    """The loss stays finite, but one parameter's gradient is Inf (an overflow in backward)."""
    param = next(p for p in policy.parameters() if p.requires_grad)
    handle = param.register_hook(lambda g: torch.full_like(g, float("inf")))
    return handle.remove


def assert_state_equal(a: tuple[dict, dict], b: tuple[dict, dict], what: str) -> None:
    assert_same_tensors(a[0], b[0], f"{what}: policy")
    sa, sb = a[1]["state"], b[1]["state"]
    assert sa.keys() == sb.keys(), what
    for k in sa:
        assert_same_tensors(sa[k], sb[k], f"{what}: Adam state of parameter {k}")


@pytest.mark.parametrize("fault", [nan_values, nan_observations, inf_gradient])
def test_nan_or_inf_update_is_skipped_and_counted(data_dir, tmp_path, monkeypatch, fault):
    """A fault during update 3 of 5: that update is rolled back completely (weights, normaliser statistics,
    Adam moments), counted in train/skipped_updates, and the run goes on to total_steps."""
    rec = UpdateRecorder(monkeypatch, lambda u, policy: fault(policy) if u == 3 else None)
    result = run(overrides(data_dir, tmp_path, "nan", 5))
    assert result["updates"] == 5 and rec.update == 5
    assert [r.skipped for r in rec.returned] == [False, False, True, False, False]
    assert_state_equal(rec.after[2], rec.before[2], "the skipped update 3")
    for u in (0, 1, 3, 4):  # the others did change the weights
        assert any(not torch.equal(rec.after[u][0][k], rec.before[u][0][k]) for k in rec.before[u][0]), u
    assert all(torch.isfinite(v).all() for v in rec.after[4][0].values() if v.is_floating_point())
    scalars = read_scalars(tmp_path / "nan")
    skipped = scalars["train/skipped_updates"]
    assert [skipped[u * PER_UPDATE] for u in range(1, 6)] == [0, 0, 1, 1, 1]
    assert math.isnan(scalars["loss/value"][3 * PER_UPDATE])
    assert all(math.isfinite(scalars["loss/value"][u * PER_UPDATE]) for u in (1, 2, 4, 5))


def test_k_bad_updates_in_a_row_stop_the_run_with_the_state_from_before(data_dir, tmp_path, monkeypatch,
                                                                         capsys):
    """NaN from update 3 on, ppo.max_bad_updates=2: updates 3 and 4 are skipped, then `ddppo train` stops with one
    line; the saved resume state holds the weights and Adam moments of an uninterrupted 2-update run. Once the
    fault is gone, the same command resumes from it."""
    ov = overrides(data_dir, tmp_path, "bad", 8, "ppo.max_bad_updates=2")
    with monkeypatch.context() as m:
        rec = UpdateRecorder(m, lambda u, policy: nan_values(policy) if u >= 3 else None)
        capsys.readouterr()
        assert train_script.main(ov) == 2
    assert rec.update == 4
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "NaN/Inf" in err and "updates 3-4" in err and "ppo.lr" in err, err
    assert captured.out.count("update skipped") == 2
    run_dir = tmp_path / "bad"
    saved = checkpoint.load(run_dir / "resume.pt")
    assert saved["state"]["update"] == 4 and saved["state"]["skipped_updates"] == 2

    run(overrides(data_dir, tmp_path, "ref2", 2, "ppo.max_bad_updates=2"))
    ref = checkpoint.load(tmp_path / "ref2" / "resume.pt")
    assert_same_tensors(saved["policy"], ref["policy"], "resume state after 2 good and 2 skipped updates")
    for k in ref["optimizer"]["state"]:
        assert_same_tensors(saved["optimizer"]["state"][k], ref["optimizer"]["state"][k], f"Adam state {k}")
    assert read_scalars(run_dir)["train/skipped_updates"][4 * PER_UPDATE] == 2

    result = run(overrides(data_dir, tmp_path, "bad", 6, "ppo.max_bad_updates=2"))  # the fault is gone
    assert result["resumed_from_update"] == 4 and result["updates"] == 6


def test_nan_observation_in_a_rollout_stops_with_one_line(data_dir, tmp_path, monkeypatch, capsys):
    """A simulator that starts returning NaN depth mid-run (a broken sensor): the policy's logits turn NaN at the
    next action and `ddppo train` stops with one line that says so, not a torch.distributions traceback."""
    from ddppo.sim.vector_env import PointNavVectorEnv

    real_step, calls = PointNavVectorEnv.step, []

    def step(self, actions):
        result = real_step(self, actions)
        calls.append(1)
        if len(calls) >= 5:
            result.obs["depth"][0] = float("nan")
        return result

    monkeypatch.setattr(PointNavVectorEnv, "step", step)
    capsys.readouterr()
    assert train_script.main(overrides(data_dir, tmp_path, "nan_obs", 3)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "NaN/Inf" in err and "observations" in err, err
    assert len(calls) == 5  # it stopped at the first action on the bad observation


@pytest.mark.distributed
def test_nan_on_one_rank_skips_the_update_on_every_rank(data_dir, tmp_path):
    """2 Gloo ranks under torchrun, a NaN loss on rank 1 only, in update 2 of 4: both ranks skip that update (no
    rank waits in a collective the other left), the run finishes, and both end with identical weights."""
    dump = tmp_path / "dump"
    ov = [*TINY, f"task.data_dir={data_dir}", f"run_dir={tmp_path / 'runs'}", "name=nan2", "ddppo.backend=gloo",
          f"total_steps={4 * 2 * PER_UPDATE}", "log_interval=1", "checkpoint_interval=100"]
    cmd = [str(Path(sys.executable).with_name("torchrun")), "--standalone", "--nproc-per-node=2",
           str(REPO / "tests" / "helpers" / "nan_on_one_rank.py"), *ov]
    env = clean_env(DDPPO_TEST_DUMP=str(dump), DDPPO_TEST_NAN_RANK="1", DDPPO_TEST_NAN_UPDATES="2")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    infos = [json.loads((dump / f"rank{r}.json").read_text()) for r in range(2)]
    assert infos[0]["skipped"] == infos[1]["skipped"] == [0, 1, 0, 0]
    states = [torch.load(dump / f"rank{r}_policy.pt", weights_only=True) for r in range(2)]
    assert_same_tensors(states[0], states[1], "rank 0 vs rank 1 after a skipped update")
    skipped = read_scalars(tmp_path / "runs" / "nan2")["train/skipped_updates"]
    assert [skipped[u * 2 * PER_UPDATE] for u in range(1, 5)] == [0, 1, 1, 1]


# ---------------------------------------------------------------------------------------------- 7. determinism
def test_same_seed_same_first_updates_other_seed_not(data_dir, tmp_path):
    states = {}
    for name, seed in (("a", 3), ("b", 3), ("c", 4)):
        run(overrides(data_dir, tmp_path, name, 2, f"seed={seed}", "checkpoint_interval=100"))
        states[name] = checkpoint.load(tmp_path / name / "resume.pt")
    assert_same_tensors(states["a"]["policy"], states["b"]["policy"], "seed 3 twice")
    for k in states["a"]["optimizer"]["state"]:
        assert_same_tensors(states["a"]["optimizer"]["state"][k], states["b"]["optimizer"]["state"][k], "Adam")
    assert read_scalars(tmp_path / "a")["loss/value"] == read_scalars(tmp_path / "b")["loss/value"]
    differ = [k for k in states["a"]["policy"] if not torch.equal(states["a"]["policy"][k], states["c"]["policy"][k])]
    assert len(differ) > len(states["a"]["policy"]) // 2, f"seed 3 vs 4: only {differ} differ"


# ---------------------------------------------------------------------------------------------- 8. soak


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS in /proc/self/status")


@pytest.mark.slow
def test_soak_memory_flat_every_episode_ends_no_nan(data_dir, tmp_path, monkeypatch):
    """32 environments at 16x16 for ~6k steps (DDPPO_LONG_TESTS=1: ~100k): resident memory flat after warm-up,
    no observation NaN/Inf, and no environment stuck: every episode ends within max_episode_steps. Half of the
    environments get an agent that never calls STOP (its STOP turned into MOVE_FORWARD before the env sees it),
    so their episodes can only end by the time limit, which must then cut every one at exactly max_episode_steps."""
    num_envs, num_steps, max_steps = 32, 16, 40
    updates = 200 if LONG else 12
    never_stops = torch.arange(num_envs) % 2 == 0
    seen = {"envs": [], "max_counter": 0, "nonfinite": 0, "lengths": {e: [] for e in range(num_envs)}}
    rss = []

    real_make = trainer.make_vector_env

    def make_vector_env(*args, **kwargs):  # observe every step of the trainer's env
        envs = real_make(*args, **kwargs)
        seen["envs"].append(envs)
        real_step = envs.step
        since_start = torch.zeros(envs.num_envs, dtype=torch.long)

        def step(actions):
            actions = torch.where(never_stops.to(actions.device) & (actions == 0), 1, actions)
            result = real_step(actions)
            done = result.done.cpu()
            since_start.add_(1)
            for e in done.nonzero().flatten().tolist():
                seen["lengths"][e].append(int(since_start[e]))
            since_start[done] = 0
            seen["max_counter"] = max(seen["max_counter"], int(envs.steps.max()))  # the env's own step counter
            for v in result.obs.values():
                if v.is_floating_point():
                    seen["nonfinite"] += int((~torch.isfinite(v)).sum())
            return result

        envs.step = step
        return envs

    monkeypatch.setattr(trainer, "make_vector_env", make_vector_env)
    real_update = trainer.ppo_update

    def ppo_update(*args, **kwargs):
        out = real_update(*args, **kwargs)
        rss.append(rss_mib())
        return out

    monkeypatch.setattr(trainer, "ppo_update", ppo_update)
    ov = [*TINY, f"ppo.num_envs={num_envs}", f"ppo.num_steps={num_steps}", "ppo.num_mini_batch=4",
          f"task.max_episode_steps={max_steps}", f"task.data_dir={data_dir}", f"run_dir={tmp_path}", "name=soak",
          f"total_steps={updates * num_envs * num_steps}", "log_interval=4", "checkpoint_interval=4"]
    result = trainer.train(load_config(None, ov), log=quiet, show_progress=False)
    assert result["updates"] == updates and len(seen["envs"]) == 1
    assert seen["nonfinite"] == 0, f"{seen['nonfinite']} non-finite observation values"
    assert seen["max_counter"] <= max_steps
    total = updates * num_steps
    for e, lengths in seen["lengths"].items():
        if never_stops[e]:  # only the time limit ends these: every episode exactly max_episode_steps long
            assert lengths == [max_steps] * (total // max_steps), (e, lengths)
        else:
            assert lengths and max(lengths) <= max_steps, (e, lengths)
    warm = rss[3]  # after warm-up (allocator pools, caches, the first checkpoint written)
    growth = max(rss[3:]) - warm
    assert growth < 32, f"RSS grew {growth:.0f} MiB after warm-up: {[round(r) for r in rss]}"
