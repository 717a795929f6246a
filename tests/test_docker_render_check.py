"""docker/render_check.py's frame check, which CI runs inside the image on habitat-sim's renders: it passes a real
picture of the scene and fails a blank one, depth without range, and sensors that disagree (no habitat-sim needed)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
R = 32


@pytest.fixture(scope="module")
def render_check():
    spec = importlib.util.spec_from_file_location("render_check", ROOT / "docker" / "render_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def room_view() -> dict:
    """A wall and a floor in flat colours under black sky; depth 0 where the sky is, as habitat-sim renders its test
    scenes (they have no lights)."""
    rgb = np.zeros((R, R, 4), np.uint8)
    rgb[..., 3] = 255
    depth = np.zeros((R, R), np.float32)
    rgb[R // 2:, :, :3] = 200  # floor
    depth[R // 2:, :] = np.linspace(4.0, 0.8, R - R // 2, dtype=np.float32)[:, None]
    rgb[R // 4:R // 2, R // 3:, :3] = (150, 120, 80)  # a wall
    depth[R // 4:R // 2, R // 3:] = 3.0
    return {"rgb": rgb, "depth": depth}


def test_a_real_view_passes(render_check):
    assert render_check.check_frames(room_view(), R) == []


def test_a_blank_frame_fails(render_check):
    obs = room_view()
    obs["rgb"][..., :3] = 0
    assert any("blank" in m for m in render_check.check_frames(obs, R))


def test_depth_without_range_fails(render_check):
    obs = room_view()
    obs["depth"][:] = 0
    assert any(m.startswith("depth") for m in render_check.check_frames(obs, R))


def test_sensors_that_disagree_fail(render_check):
    obs = room_view()
    obs["depth"] = obs["depth"][::-1].copy()  # the floor's depth where the sky is
    assert any("disagree" in m for m in render_check.check_frames(obs, R))


def test_wrong_shape_or_type_fails(render_check):
    obs = room_view()
    assert render_check.check_frames({**obs, "rgb": obs["rgb"][..., :3]}, R)
    assert render_check.check_frames({**obs, "depth": obs["depth"].astype(np.float64)}, R)
    assert render_check.check_frames(obs, R * 2)


def test_the_gpu_default_follows_the_nvidia_device(render_check, monkeypatch):
    monkeypatch.setattr(render_check.Path, "exists", lambda self: str(self) == "/dev/nvidia0")
    assert render_check.default_gpu() == 0
    monkeypatch.setattr(render_check.Path, "exists", lambda self: False)
    assert render_check.default_gpu() == -1
