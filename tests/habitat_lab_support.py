"""Where the tests that take habitat-lab as the oracle run: wherever habitat-sim and habitat-lab import. They skip
with the reason elsewhere, and fail instead where DDPPO_REQUIRE_SYSTEM is set (CI installs both; see
tests/system_support.py), as tests/habitat_support.py does for habitat-sim."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from habitat_support import need_habitat
from system_support import lacking


def need_habitat_lab():
    """The ``habitat`` (habitat-lab) module; else skip (or fail where DDPPO_REQUIRE_SYSTEM is set)."""
    need_habitat()
    try:
        import habitat
    except Exception as e:  # not installed, or a version that does not import beside this habitat-sim
        lines = str(e).strip().splitlines()
        reason = f"habitat-lab does not import here ({type(e).__name__}: {lines[0] if lines else ''})"
        lacking(reason)
    return habitat


TEST_SCENES = Path(os.environ.get("DDPPO_HABITAT_TEST_SCENES",
                                  Path(__file__).resolve().parents[2] / "shared" / "habitat" / "test_scenes"))
"""habitat-sim's own small test scenes (simple_room.glb ...), beside the repository where CI has them."""


def habitat_test_scene(name: str, into: Path) -> Path:
    """A copy of habitat-sim's test scene ``name`` in ``into`` (tests add a navmesh beside it); skip (or fail where
    DDPPO_REQUIRE_SYSTEM is set) where the test scenes are not on this machine."""
    source = TEST_SCENES / name
    if not source.is_file():
        reason = f"habitat-sim's test scene {source} is not here (set DDPPO_HABITAT_TEST_SCENES to its directory)"
        lacking(reason)
    into.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, into / name)
    return into / name


def navmesh_for(hs, scene: Path, radius: float, height: float = 1.5, save: bool = False):
    """habitat-sim's navmesh of ``scene`` for an agent of ``radius`` and ``height`` (its other settings the
    defaults), computed by a bare Simulator: a PathFinder holding it, also saved beside the scene when ``save``."""
    cfg = hs.SimulatorConfiguration()
    cfg.scene_id, cfg.gpu_device_id, cfg.enable_physics = str(scene), -1, False
    sim = hs.Simulator(hs.Configuration(cfg, [hs.AgentConfiguration(height=height, radius=radius)]))
    try:
        settings = hs.NavMeshSettings()
        settings.set_defaults()
        settings.agent_radius, settings.agent_height = radius, height
        assert sim.recompute_navmesh(sim.pathfinder, settings), f"habitat-sim built no navmesh for {scene}"
        path = scene.with_suffix(".navmesh") if save else scene.parent / f".{scene.stem}.r{radius}.navmesh"
        assert sim.pathfinder.save_nav_mesh(str(path))
    finally:
        sim.close()
    pathfinder = hs.PathFinder()
    pathfinder.load_nav_mesh(str(path))
    return pathfinder
