"""The habitat path speaks only when something is wrong: ``ddppo scene export`` and habitat-sim environments print
their own lines and nothing of habitat-sim's or Magnum's (no GL banner per process, no semantic-scene error per
scene), and ``HABITAT_SIM_LOG=verbose MAGNUM_LOG=verbose`` brings all of it back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from habitat_support import need_habitat

from ddppo.sim.habitat_backend import QUIET_LOGS

STEP_HABITAT_ENVS = """
import sys, torch
from ddppo.config import load_config
from ddppo.sim.environments import make_vector_env
out = sys.argv[1]
cfg = load_config(None, [f"task.data_dir={out}", f"task.scenes_dir={out}", "task.split=val", "sim.backend=habitat",
                         "task.generate_if_missing=false", "sim.resolution=16"])
envs = make_vector_env(cfg, "val", 2, order="partition")
envs.reset()
for _ in range(3):
    envs.step(torch.tensor([1, 2]))
envs.close()
print("stepped")
"""
HABITAT_NOISE = ("[Error]", "[Warning]", "Renderer:", "OpenGL version", "Using driver workarounds", "SSD")


def run(args: list[str], **env: str) -> list[str]:
    """stdout and stderr lines of a fresh process, with the user's environment less the two logging settings."""
    base = {k: v for k, v in os.environ.items() if k not in QUIET_LOGS}
    done = subprocess.run(args, capture_output=True, text=True, timeout=600, env={**base, **env})
    assert done.returncode == 0, done.stderr[-3000:]
    return (done.stdout + done.stderr).splitlines()


@pytest.fixture(scope="module")
def exported(small_dataset, tmp_path_factory):
    need_habitat()
    out = tmp_path_factory.mktemp("quiet") / "data"
    lines = run([sys.executable, "-m", "ddppo", "scene", "export", str(small_dataset), "--out", str(out),
                 "--split", "val"])
    return out, lines


def test_scene_export_prints_only_its_own_lines(exported):
    out, lines = exported
    assert lines and all(line.startswith(("scene ", "val: ")) for line in lines), lines
    assert sorted(p.name for p in out.glob("*.stage_config.json")) == [
        "val_0000.stage_config.json", "val_0001.stage_config.json", "val_0002.stage_config.json"]


def test_habitat_environments_are_quiet_and_verbose_on_request(exported):
    out, _ = exported
    quiet = run([sys.executable, "-c", STEP_HABITAT_ENVS, str(out)])
    assert quiet == ["stepped"], quiet
    verbose = run([sys.executable, "-c", STEP_HABITAT_ENVS, str(out)], HABITAT_SIM_LOG="verbose",
                  MAGNUM_LOG="verbose")
    assert any("OpenGL version" in line for line in verbose), verbose[:20]
    # verbose, the semantic-scene error is still absent: each exported mesh's stage config names no .scn
    assert not any("[Error]" in line for line in verbose), [line for line in verbose if "[Error]" in line]
