"""bench/overlap_probe.py (the measurement behind "overlapping simulation with inference does not pay on cpu2"): it
runs end to end, threaded and with a worker process, its two halves draw the episodes of the one batched
environment, and --nogil really recompiles the simulator's kernels without the GIL."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numba
import pytest
import torch
from tiny import TINY_AGENT

from ddppo.config import load_config
from ddppo.sim.environments import make_vector_env

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "overlap_probe.py"
TINY = [*TINY_AGENT, "ppo.num_envs=4"]


def load_probe(monkeypatch):
    """The script as module ``overlap_probe``, importable by name (its worker process imports it to unpickle its
    target, as it imports ``__main__`` when the script runs)."""
    monkeypatch.syspath_prepend(str(SCRIPT.parent))
    spec = importlib.util.spec_from_file_location("overlap_probe", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "overlap_probe", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def restore_threads():
    """The probe sets torch's and numba's thread counts for this process: put them back (later tests compare runs
    in this process with runs in fresh ones, which must use the same kernels)."""
    before = torch.get_num_threads(), numba.get_num_threads()
    yield
    torch.set_num_threads(before[0])
    numba.set_num_threads(before[1])


def test_probe_runs_and_releases_the_gil(small_dataset, monkeypatch, capsys, restore_threads):
    probe = load_probe(monkeypatch)
    kernels = probe.step_kernels()
    # every compiled per-step kernel of the simulator's modules is in the list
    compiled = {(m.__name__, n) for m in {m for m, _ in kernels} for n, v in vars(m).items()
                if isinstance(v, numba.core.registry.CPUDispatcher) and not v.targetoptions.get("inline")}
    assert compiled == {(m.__name__, n) for m, n in kernels}
    for module, name in kernels:
        monkeypatch.setattr(module, name, getattr(module, name))  # restored after the test
        assert not getattr(module, name).targetoptions.get("nogil")
    threads = torch.get_num_threads()
    out = probe.main(["--steps", "3", "--repeats", "1", "--threads", str(threads), *TINY,
                      f"task.data_dir={small_dataset}"])
    assert out["threads"] == threads
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(out))
    assert out["fps_sequential"] > 0 and out["fps_overlapped"] > 0 and out["fps_overlapped_process"] > 0
    assert out["overlap_speedup"] == out["fps_overlapped"] / out["fps_sequential"]
    assert out["process_overlap_speedup"] == out["fps_overlapped_process"] / out["fps_sequential"]
    for module, name in kernels:
        assert getattr(module, name).targetoptions["nogil"] is True, name


def test_halves_draw_the_same_episodes(small_dataset):
    cfg = load_config(None, [*TINY, f"task.data_dir={small_dataset}"])
    whole = make_vector_env(cfg, "train", 4, seed=cfg.seed, env_offset=0)
    halves = [make_vector_env(cfg, "train", 2, seed=cfg.seed, env_offset=k * 2) for k in (0, 1)]
    whole.reset()
    for h in halves:
        h.reset()
    for _ in range(30):  # STOP now and then: episodes end and the next ones start
        actions = torch.tensor([0, 1, 2, 1])
        a = whole.step(actions)
        b = [h.step(actions[2 * k: 2 * k + 2]) for k, h in enumerate(halves)]
        for key in a.obs:
            torch.testing.assert_close(a.obs[key], torch.cat([r.obs[key] for r in b]))
        assert torch.equal(a.info["episode_index"], torch.cat([r.info["episode_index"] for r in b]))
