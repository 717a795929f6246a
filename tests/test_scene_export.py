"""Exporting embedded scenes as meshes (``ddppo scene export``), checked by reading the GLB back with trimesh: its
extent, which cells its walls and objects fill (a horizontal section, inside/outside by ray crossing), its colours,
and the command's files and errors. Runs without habitat-sim; tests/test_habitat_crosscheck.py loads the same
meshes in habitat-sim."""

from __future__ import annotations

import dataclasses
import gzip
import json

import numpy as np
import pytest
import trimesh

from ddppo.launch.cli import main
from ddppo.sim.dataset import load_episodes
from ddppo.sim.dataset_dir import episodes_path, load_split
from ddppo.sim.scene import FREE, OBJECT, WALL, load_scene
from ddppo.sim.scene_export import (
    FLOOR_THICKNESS,
    HABITAT_TO_FILE,
    CellRect,
    habitat_imports,
    merge_rectangles,
    write_glb,
)

ROOM_COLORS = np.array([[[10, 20, 30], [40, 50, 60]], [[70, 80, 90], [100, 110, 120]]], np.uint8)
OBJECT_COLORS = np.array([[200, 10, 10]], np.uint8)


@pytest.fixture
def two_rooms(make_scene):
    """2 m x 3 m: rooms 0 (columns < 30) and 1, split by a wall 4 cells thick (columns 28-31) with a door in rows
    15-24, and an object of room 1 (rows 5-9, columns 40-47)."""
    occ = np.zeros((40, 60), np.uint8)
    occ[:, 28:32] = WALL
    occ[15:25, 28:32] = FREE
    occ[5:10, 40:48] = OBJECT
    material = np.where(np.arange(60)[None, :] < 30, 0, 1).repeat(40, axis=0).astype(np.int32)
    material[occ == OBJECT] = 0  # the object's colour index
    return make_scene(occ, material=material, room_colors=ROOM_COLORS, object_colors=OBJECT_COLORS, name="two_rooms")


def load_parts(path) -> dict[str, trimesh.Trimesh]:
    """The GLB's meshes by name, back in habitat's frame."""
    loaded = trimesh.load(path, force="scene")
    back = np.linalg.inv(HABITAT_TO_FILE)
    out = {}
    for name, mesh in loaded.geometry.items():
        mesh = mesh.copy()
        mesh.apply_transform(back)
        out[name] = mesh
    return out


def inside_section(mesh: trimesh.Trimesh, y: float, x: np.ndarray, z: np.ndarray) -> np.ndarray:
    """Whether points (x, y, z) are inside the mesh's section by the plane at height y: the parity of the section's
    segments crossed by a ray from each point towards +x."""
    seg = trimesh.intersections.mesh_plane(mesh, plane_normal=[0, 1, 0], plane_origin=[0, y, 0])
    a, b = seg[:, 0], seg[:, 1]
    out = np.zeros(len(x), bool)
    for lo in range(0, len(x), 2048):
        px, pz = x[lo:lo + 2048, None], z[lo:lo + 2048, None]
        crosses = (a[None, :, 2] <= pz) != (b[None, :, 2] <= pz)
        dz = np.where(b[:, 2] == a[:, 2], 1.0, b[:, 2] - a[:, 2])
        x_at = a[:, 0] + (pz - a[:, 2]) / dz * (b[:, 0] - a[:, 0])
        out[lo:lo + 2048] = (crosses & (x_at > px)).sum(axis=1) % 2 == 1
    return out


def cell_centres(scene):
    jj, ii = np.indices(scene.shape)
    x, z = scene.cell_center(jj.ravel(), ii.ravel())
    return np.asarray(x, float), np.asarray(z, float)


def colour_of(mesh) -> tuple[int, ...]:
    return tuple(int(c) for c in mesh.visual.material.baseColorFactor[:3])


# ------------------------------------------------------------------------------------------- rectangles
def test_merge_rectangles_by_hand():
    labels = np.array([[1, 1, 0, 3],
                       [1, 1, 0, 3],
                       [2, 2, 2, 3]])
    assert sorted(merge_rectangles(labels, skip=0), key=lambda r: (r.label, r.j0)) == [
        CellRect(0, 0, 2, 2, 1), CellRect(2, 0, 3, 3, 2), CellRect(0, 3, 3, 4, 3)]


def test_merge_rectangles_cover_every_labelled_cell_once():
    rng = np.random.default_rng(0)
    for _ in range(20):
        labels = rng.integers(-1, 3, size=(rng.integers(1, 30), rng.integers(1, 30)))
        labels = np.repeat(np.repeat(labels, 2, axis=0), 3, axis=1)  # blocks, so that runs merge
        painted = np.full(labels.shape, -1)
        count = np.zeros(labels.shape, int)
        for r in merge_rectangles(labels):
            painted[r.j0:r.j1, r.i0:r.i1] = r.label
            count[r.j0:r.j1, r.i0:r.i1] += 1
        assert np.array_equal(painted, labels)
        assert np.array_equal(count, (labels != -1).astype(int))


# ------------------------------------------------------------------------------------------- the mesh
def test_glb_has_the_scene_extent_walls_objects_and_free_space(two_rooms, tmp_path):
    scene = two_rooms
    parts = load_parts(write_glb(scene, tmp_path / "two_rooms.glb"))
    merged = trimesh.util.concatenate(list(parts.values()))
    (x0, z0), (w, d) = scene.origin, scene.extent
    assert np.allclose(merged.bounds, [[x0, -FLOOR_THICKNESS, z0], [x0 + w, scene.ceiling_height, z0 + d]], atol=1e-5)
    x, z = cell_centres(scene)
    solid = trimesh.util.concatenate([m for n, m in parts.items() if n.startswith(("wall", "object"))])
    assert np.array_equal(inside_section(solid, scene.ceiling_height / 2, x, z), scene.occupancy.ravel() != FREE)
    column = np.indices(scene.shape)[1].ravel()
    occ = scene.occupancy.ravel()
    # each room paints the wall cells nearest to it (the dividing wall splits along its middle) and its floor
    expected = {"wall_0": (occ == WALL) & (column < 30), "wall_1": (occ == WALL) & (column >= 30),
                "object_0": occ == OBJECT}
    for name, cells in expected.items():
        assert np.array_equal(inside_section(parts[name], 1.0, x, z), cells), name
    for room in (0, 1):
        floor = inside_section(parts[f"floor_{room}"], -FLOOR_THICKNESS / 2, x, z)
        assert np.array_equal(floor, (column < 30) == (room == 0))
        assert colour_of(parts[f"floor_{room}"]) == tuple(ROOM_COLORS[room, 0])
        assert colour_of(parts[f"wall_{room}"]) == tuple(ROOM_COLORS[room, 1])
    assert colour_of(parts["object_0"]) == tuple(OBJECT_COLORS[0])


def test_the_ceiling_faces_down_over_every_free_cell(two_rooms, tmp_path):
    scene = two_rooms
    ceiling = load_parts(write_glb(scene, tmp_path / "two_rooms.glb"))["ceiling"]
    assert np.allclose(ceiling.vertices[:, 1], scene.ceiling_height, atol=1e-5)
    assert np.allclose(ceiling.face_normals, [0, -1, 0], atol=1e-6)
    # seen from below, its triangles cover every free cell's centre
    x, z = cell_centres(scene)
    free = scene.occupancy.ravel() == FREE
    tri = ceiling.triangles[:, :, [0, 2]]  # [T, 3, (x, z)]
    p = np.stack([x[free], z[free]], axis=1)[:, None, None, :]
    v0, v1, v2 = tri[None, :, 0:1], tri[None, :, 1:2], tri[None, :, 2:3]
    cross = lambda a, b, c: ((b - a)[..., 0] * (c - a)[..., 1] - (b - a)[..., 1] * (c - a)[..., 0])  # noqa: E731
    signs = np.concatenate([cross(v0, v1, p), cross(v1, v2, p), cross(v2, v0, p)], axis=-1)
    in_triangle = (signs >= 0).all(-1) | (signs <= 0).all(-1)
    assert in_triangle.any(axis=1).all()


def test_a_generated_scene_round_trips(small_dataset, tmp_path):
    scene = load_scene(small_dataset / "scenes" / "val_0000.npz")
    path = write_glb(scene, tmp_path / "val_0000.glb")
    parts = load_parts(path)
    solid = trimesh.util.concatenate([m for n, m in parts.items() if n.startswith(("wall", "object"))])
    x, z = cell_centres(scene)
    assert np.array_equal(inside_section(solid, scene.ceiling_height / 2, x, z), scene.occupancy.ravel() != FREE)
    # merged into rectangles: far fewer triangles than one box per occupied cell
    assert len(solid.faces) < 12 * int((scene.occupancy != FREE).sum()) / 50


# ------------------------------------------------------------------------------------------- the command
def test_scene_export_writes_meshes_and_a_habitat_dataset(small_dataset, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["scene", "export", str(small_dataset), "--out", str(out), "--split", "val"]) == 0
    episodes = load_episodes(episodes_path(out, "val"))
    assert episodes == [dataclasses.replace(e, scene_id=f"{e.scene_id}.glb")
                        for e in load_episodes(episodes_path(small_dataset, "val"))]
    with gzip.open(episodes_path(out, "val"), "rt") as f:
        ids = {e["scene_id"] for e in json.load(f)["episodes"]}
    assert ids == {"val_0000.glb", "val_0001.glb", "val_0002.glb"}
    for scene_id in ids:
        assert (out / scene_id).is_file()  # relative to OUT: task.scenes_dir=OUT
        assert (out / scene_id).with_suffix(".navmesh").is_file() == habitat_imports()
    assert not (out / "train").exists()
    load_split(out, "val")  # the embedded simulator reads the same directory
    assert main(["scene", "export", str(small_dataset / "scenes" / "train_0001.npz"), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "train_0001.glb").is_file()
    assert "val_0000.glb" in capsys.readouterr().out


@pytest.mark.parametrize("case", ["missing", "not_a_scene", "split_of_a_scene", "out_is_source", "missing_split"])
def test_scene_export_refuses_bad_input_in_one_line(case, small_dataset, tmp_path, capsys):
    source, extra = {
        "missing": (tmp_path / "nowhere", []),
        "not_a_scene": (episodes_path(small_dataset, "val"), []),
        "split_of_a_scene": (small_dataset / "scenes" / "val_0000.npz", ["--split", "val"]),
        "out_is_source": (small_dataset, []),
        "missing_split": (small_dataset, ["--split", "test"]),
    }[case]
    out = small_dataset if case == "out_is_source" else tmp_path / "out"
    assert main(["scene", "export", str(source), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("ddppo: error:") and len(err.splitlines()) == 1, err
    assert not list((tmp_path / "out").glob("*.glb"))
