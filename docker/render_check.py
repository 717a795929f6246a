"""habitat-sim renders in this image: load a scene, compute its navmesh, put the agent on it and check the RGB and depth
frames are real pictures (not blank, not one value), then take a few steps. Exit status 0 on success.

    python docker/render_check.py SCENE.glb [--gpu-device-id N] [--resolution 64]

Without --gpu-device-id it renders on GPU 0 when the container sees an NVIDIA device (/dev/nvidia0), else through
Mesa's software EGL (llvmpipe) with gpu_device_id=-1, the only value habitat-sim's EGL accepts on a machine without a
GPU. Stand-alone on purpose: it imports habitat_sim and numpy only, not ddppo.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np


def default_gpu() -> int:
    return 0 if Path("/dev/nvidia0").exists() else -1


def configuration(hs, scene: str, gpu: int, resolution: int):
    sim_cfg = hs.SimulatorConfiguration()
    sim_cfg.scene_id = scene
    sim_cfg.gpu_device_id = gpu
    sim_cfg.enable_physics = False
    sim_cfg.random_seed = 7
    specs = []
    for uuid, kind in (("rgb", hs.SensorType.COLOR), ("depth", hs.SensorType.DEPTH)):
        spec = hs.CameraSensorSpec()
        spec.uuid, spec.sensor_type = uuid, kind
        spec.resolution = [resolution, resolution]
        spec.position = [0.0, 1.25, 0.0]
        specs.append(spec)
    agent = hs.AgentConfiguration(height=1.5, radius=0.1, sensor_specifications=specs)
    return hs.Configuration(sim_cfg, [agent])


def check_frames(obs: dict, resolution: int) -> list[str]:
    """What is wrong with one observation (empty when both frames are real pictures of the same view).

    habitat-sim's test scenes have no lights: surfaces render in flat colours on black where nothing is hit, and
    depth is 0 there. So: both frames of the right size and type, some but not all pixels hit, depth spanning at least
    half a metre, and the two sensors agreeing on which pixels hit something."""
    rgb, depth = np.asarray(obs["rgb"]), np.asarray(obs["depth"])
    if rgb.shape != (resolution, resolution, 4) or rgb.dtype != np.uint8:
        return [f"rgb: shape {rgb.shape} dtype {rgb.dtype}"]
    if depth.shape != (resolution, resolution) or depth.dtype != np.float32 or not np.isfinite(depth).all():
        return [f"depth: shape {depth.shape} dtype {depth.dtype}, finite {np.isfinite(depth).mean():.2f}"]
    problems = []
    lit, hit = rgb[..., :3].max(axis=-1) > 0, depth > 0
    if not 0.05 <= lit.mean() <= 1.0 or float(rgb[..., :3].std()) < 5.0:
        problems.append(f"rgb: {lit.mean():.2f} of pixels not black, std {rgb[..., :3].std():.1f} (blank frame)")
    if hit.mean() < 0.05 or float(depth.max() - depth.min()) < 0.5:
        problems.append(f"depth: {hit.mean():.2f} of pixels hit, range {depth.min():.2f}-{depth.max():.2f} m")
    if (lit == hit).mean() < 0.95:
        problems.append(f"rgb and depth disagree on which pixels hit the scene ({(lit == hit).mean():.2f} agree)")
    return problems


def best_view(hs, sim, tries: int = 16):
    """The navigable point (of ``tries`` seeded random ones) whose view hits the most scene."""
    agent, best = sim.get_agent(0), (-1.0, None)
    sim.pathfinder.seed(7)
    for _ in range(tries):
        state = hs.AgentState()
        state.position = sim.pathfinder.get_random_navigable_point()
        agent.set_state(state)
        hit = float((np.asarray(sim.get_sensor_observations()["depth"]) > 0).mean())
        best = max(best, (hit, state.position), key=lambda b: b[0])
    state = hs.AgentState()
    state.position = best[1]
    agent.set_state(state)
    return sim.get_sensor_observations()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("scene")
    p.add_argument("--gpu-device-id", type=int, default=None)
    p.add_argument("--resolution", type=int, default=64)
    args = p.parse_args(argv)
    gpu = default_gpu() if args.gpu_device_id is None else args.gpu_device_id

    t0 = time.monotonic()
    import habitat_sim as hs

    print(f"render_check: habitat-sim {hs.__version__}, scene {args.scene}, gpu_device_id {gpu}", flush=True)
    sim = hs.Simulator(configuration(hs, args.scene, gpu, args.resolution))
    try:
        settings = hs.NavMeshSettings()
        settings.set_defaults()
        settings.agent_radius, settings.agent_height = 0.1, 1.5
        assert sim.recompute_navmesh(sim.pathfinder, settings), "navmesh: recompute failed"
        assert sim.pathfinder.is_loaded, "navmesh: not loaded"
        agent = sim.get_agent(0)
        obs = best_view(hs, sim)
        problems = check_frames(obs, args.resolution)
        before, collided = np.asarray(obs["depth"]).copy(), 0
        for action in ["turn_left"] * 3 + ["move_forward"] * 5:
            obs = sim.step(action)
            collided += bool(obs.get("collided", False))
        problems += [f"after 8 steps: {m}" for m in check_frames(obs, args.resolution)]
        if np.array_equal(before, np.asarray(obs["depth"])):
            problems.append("the view did not change in 8 steps")
        rgb, depth = np.asarray(obs["rgb"]), np.asarray(obs["depth"])
        print(f"render_check: navmesh area {sim.pathfinder.navigable_area:.2f} m2; agent at "
              f"{[round(float(v), 2) for v in agent.get_state().position]}; rgb {rgb.shape} {rgb.dtype} mean "
              f"{rgb[..., :3].mean():.1f} std {rgb[..., :3].std():.1f}; depth {depth.shape} {depth.dtype} "
              f"{depth.min():.2f}-{depth.max():.2f} m; {collided} collisions in 8 steps; "
              f"{time.monotonic() - t0:.1f} s", flush=True)
    finally:
        sim.close()
    for m in problems:
        print(f"render_check: FAILED: {m}", file=sys.stderr)
    if not problems:
        print("render_check: OK")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
