"""Export an embedded scene as a mesh habitat-sim loads: the same floor plan in both simulators
(docs/scene_export.md says what habitat-sim needed and what the cross-check measured).

The mesh is the scene's 2.5-D geometry in habitat's frame (y up; grid column i along +x, row j along +z from the
scene's origin), stored in the MP3D/Gibson file convention habitat-sim assumes for a ``.glb`` (``HABITAT_TO_FILE``),
as a binary glTF written with trimesh:

- the floor, a slab whose top is the plane y = 0 (``FLOOR_THICKNESS`` says why it has that thickness);
- every occupied cell a closed box from the floor to ``ceiling_height``, 1 mm inside its cell (``BOX_INSET``);
- the ceiling, the plane y = ``ceiling_height``, as downward-facing quads over the free cells. It faces down, so
  recast (habitat-sim's navmesh builder) marks it unwalkable, and it covers free cells only, so no walkable roof
  forms above the floor plan; without it the embedded simulator's ceiling would be missing from habitat's depth.

Occupied cells, floor and ceiling are merged into rectangles (runs of equal cells along a row, then equal runs of
consecutive rows), so a 12 m plan on 0.05 m cells is ~50 boxes rather than ~4,000 cubes.

Colours are glTF materials, one per colour: a room's floor colour under its cells, its wall colour on the wall
cells nearest to it (a wall between two rooms splits along its middle, so each room sees its own wall colour, as
the embedded renderer paints it), an object's colour on its cells.

With habitat-sim installed, the navmesh habitat-sim computes for our agent (radius 0.1 m, height 1.5 m) is saved
beside the mesh (``<scene>.navmesh``), so loading the scene needs no recomputation.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage

from ddppo.io.atomic import atomic_open, atomic_write_text
from ddppo.sim.habitat_backend import NAVMESH_CELL_HEIGHT, agent_navmesh_settings
from ddppo.sim.kernels.shading import CEILING_RGB
from ddppo.sim.navmesh import AGENT_HEIGHT, AGENT_RADIUS
from ddppo.sim.scene import FREE, OBJECT, Scene, load_scene, save_scene

FLOOR_THICKNESS = NAVMESH_CELL_HEIGHT - 0.001
"""The floor is a slab under y = 0 this thick. Recast stacks its voxels from the mesh's lowest point in steps of the
cell height and puts the navmesh on the top of the floor's voxel: a floor with no thickness (or one cell height
thick, give or take float rounding) leaves the navmesh, and so habitat's agent and its camera, one cell height
(0.2 m) above the floor; this thickness leaves it 1 mm above."""
BOX_INSET = 0.001
"""Walls and objects are this much smaller than their cells on every side, so that recast's voxel columns (aligned
with the scene's cells, from the mesh's lowest corner) are solid exactly under the occupied cells: a face exactly
on a column boundary makes the column beside it solid or not by float rounding."""
HABITAT_TO_FILE = np.array([[1.0, 0, 0, 0], [0, 0, -1.0, 0], [0, 1.0, 0, 0], [0, 0, 0, 1.0]])
"""habitat world (x, y, z) -> file (x, -z, y): habitat-sim loads a ``.glb`` stage without a config as an MP3D /
Gibson mesh, z up and +y in front, and turns it to its y-up frame; exported scenes follow that convention, so their
``scene_id`` is the ``.glb`` itself, as for Gibson, and the ``.navmesh`` beside it is found by name."""


@dataclass(frozen=True)
class CellRect:
    """Cells [j0, j1) x [i0, i1) of the grid, all with the same ``label``."""

    j0: int
    i0: int
    j1: int
    i1: int
    label: int


def merge_rectangles(labels: np.ndarray, skip: int = -1) -> list[CellRect]:
    """Cover every cell whose label is not ``skip`` by disjoint rectangles of one label each: the runs of equal
    labels along each row, a run extended downwards while the next row has the same run."""
    open_rects: dict[tuple[int, int, int], int] = {}  # (i0, i1, label) -> first row
    out: list[CellRect] = []
    h = labels.shape[0]
    for j in range(h + 1):
        runs = set(_row_runs(labels[j], skip)) if j < h else set()
        for key in [k for k in open_rects if k not in runs]:
            out.append(CellRect(open_rects.pop(key), key[0], j, key[1], key[2]))
        for key in runs:
            open_rects.setdefault(key, j)
    return out


def _row_runs(row: np.ndarray, skip: int) -> list[tuple[int, int, int]]:
    """(i0, i1, label) of each run of equal labels in ``row``, ``skip`` runs left out."""
    starts = np.flatnonzero(np.r_[True, row[1:] != row[:-1]])
    ends = np.r_[starts[1:], len(row)]
    return [(int(a), int(b), int(row[a])) for a, b in zip(starts, ends) if row[a] != skip]


def colour_labels(scene: Scene) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The colour label of every cell's floor and of every occupied cell (-1 where free), and the palette.

    Labels index the palette [floor, wall] per room, then the object colours (the embedded renderer's order).
    A cell's room is its own when free, else that of the nearest free cell."""
    free = scene.occupancy == FREE
    _, (nj, ni) = ndimage.distance_transform_edt(~free, return_indices=True)
    room = scene.material[nj, ni]
    floor = 2 * room
    solid = np.where(free, -1, 2 * room + 1)
    objects = scene.occupancy == OBJECT
    solid[objects] = 2 * len(scene.room_colors) + scene.material[objects]
    palette = np.concatenate([scene.room_colors.reshape(-1, 3), scene.object_colors.reshape(-1, 3)])
    return floor.astype(np.int64), solid.astype(np.int64), palette


def _corners(scene: Scene, rects: list[CellRect]) -> tuple[np.ndarray, np.ndarray]:
    """World (x, z) of each rectangle's low and high corner: [n, 2] each."""
    r = np.array([(q.i0, q.j0, q.i1, q.j1) for q in rects], np.float64).reshape(-1, 4)
    origin = np.asarray(scene.origin, np.float64)
    return origin + r[:, :2] * scene.cell_size, origin + r[:, 2:] * scene.cell_size


def _boxes(scene: Scene, rects: list[CellRect], bottom: float, top: float, inset: float = 0.0):
    """Closed boxes over ``rects`` from ``bottom`` to ``top``, ``inset`` metres inside the rectangles' sides,
    outward normals (trimesh's unit box, scaled)."""
    import trimesh

    unit = trimesh.creation.box(extents=(1.0, 1.0, 1.0))
    template = unit.vertices + 0.5  # corners in [0, 1]^3
    lo, hi = _corners(scene, rects)
    lo, hi = lo + inset, hi - inset
    n = len(rects)
    lo3 = np.stack([lo[:, 0], np.full(n, bottom), lo[:, 1]], axis=1)
    size = np.stack([hi[:, 0] - lo[:, 0], np.full(n, top - bottom), hi[:, 1] - lo[:, 1]], axis=1)
    vertices = (lo3[:, None, :] + template[None] * size[:, None, :]).reshape(-1, 3)
    faces = (unit.faces[None] + 8 * np.arange(n)[:, None, None]).reshape(-1, 3)
    return trimesh.Trimesh(vertices, faces, process=False)


def _ceiling(scene: Scene, rects: list[CellRect]):
    """Horizontal quads at the ceiling height over ``rects``, grown by twice BOX_INSET so that they reach over the
    inset boxes' tops (else a camera sees through the gap), each two triangles wound so that their normal points
    down."""
    import trimesh

    lo, hi = _corners(scene, rects)
    lo, hi = lo - 2 * BOX_INSET, hi + 2 * BOX_INSET
    n = len(rects)
    xs = np.stack([lo[:, 0], hi[:, 0], hi[:, 0], lo[:, 0]], axis=1)
    zs = np.stack([lo[:, 1], lo[:, 1], hi[:, 1], hi[:, 1]], axis=1)
    vertices = np.stack([xs, np.full((n, 4), scene.ceiling_height), zs], axis=2).reshape(-1, 3)
    # triangle (x0,z0), (x1,z0), (x1,z1): normal (x1-x0, 0, 0) x (x1-x0, 0, z1-z0) points along -y
    down = np.array([[0, 1, 2], [0, 2, 3]])
    faces = (down[None] + 4 * np.arange(n)[:, None, None]).reshape(-1, 3)
    return trimesh.Trimesh(vertices, faces, process=False)


def _material(rgb: np.ndarray):
    from trimesh.visual import TextureVisuals
    from trimesh.visual.material import PBRMaterial

    rgba = [int(c) for c in rgb] + [255]
    return TextureVisuals(material=PBRMaterial(baseColorFactor=rgba, metallicFactor=0.0, roughnessFactor=1.0))


def scene_mesh(scene: Scene):
    """The scene as a ``trimesh.Scene`` in the file's frame (``HABITAT_TO_FILE``): one mesh per part and colour
    (floor_*, wall_*, object_*, ceiling)."""
    import trimesh

    scene.validate(scene.name)
    floor, solid, palette = colour_labels(scene)
    rooms = len(scene.room_colors)
    parts: dict[str, list[CellRect]] = {}
    for rect in merge_rectangles(solid):
        kind = f"wall_{(rect.label - 1) // 2}" if rect.label < 2 * rooms else f"object_{rect.label - 2 * rooms}"
        parts.setdefault(kind, []).append(rect)
    for rect in merge_rectangles(floor):
        parts.setdefault(f"floor_{rect.label // 2}", []).append(rect)
    out = trimesh.Scene()
    for name, rects in sorted(parts.items()):
        if name.startswith("floor"):
            mesh = _boxes(scene, rects, -FLOOR_THICKNESS, 0.0)
        else:
            mesh = _boxes(scene, rects, 0.0, scene.ceiling_height, inset=BOX_INSET)
        _add(out, name, mesh, palette[rects[0].label])
    # the embedded renderer's ceiling colour
    _add(out, "ceiling", _ceiling(scene, merge_rectangles(np.where(scene.occupancy == FREE, 0, -1))), CEILING_RGB)
    return out


def _add(out, name: str, mesh, rgb) -> None:
    mesh.visual = _material(rgb)
    mesh.apply_transform(HABITAT_TO_FILE)
    out.add_geometry(mesh, geom_name=name, node_name=name)


def write_glb(scene: Scene, path: str | Path) -> Path:
    """Write the scene's mesh as ``path`` (binary glTF) and its stage config beside it (``stage_config``), each
    atomically."""
    path = Path(path)
    data = scene_mesh(scene).export(file_type="glb")
    with atomic_open(path) as f:
        f.write(data)
    atomic_write_text(path.with_name(f"{path.stem}{STAGE_CONFIG_SUFFIX}"), json.dumps(stage_config(path), indent=1))
    return path


STAGE_CONFIG_SUFFIX = ".stage_config.json"


def stage_config(glb: Path) -> dict:
    """habitat-sim's stage attributes for an exported mesh, which it reads from ``{stem}.stage_config.json`` beside a
    ``.glb`` it loads: the frame ``HABITAT_TO_FILE`` describes (z up, +y in front, as it assumes for a bare ``.glb``)
    and no semantic scene. Without the file habitat-sim looks for a semantic descriptor ``{stem}.scn`` and logs an
    error for every scene it loads ("SSD Load Failure"), though an exported scene has no semantics to load."""
    return {"render_asset": glb.name, "up": [0.0, 0.0, 1.0], "front": [0.0, 1.0, 0.0],
            "semantic_descriptor_filename": ""}


def write_navmesh(glb: str | Path, path: str | Path) -> Path:
    """Load ``glb`` in habitat-sim (no renderer), compute its navmesh for our agent and save it as ``path``,
    atomically. Raises HabitatUnavailable where habitat-sim does not import."""
    from ddppo.sim.habitat_backend import require_habitat_sim

    hs = require_habitat_sim()
    sim_cfg = hs.SimulatorConfiguration()
    sim_cfg.scene_id = str(glb)
    sim_cfg.create_renderer = False
    sim_cfg.enable_physics = False
    sim_cfg.gpu_device_id = -1
    agent = hs.AgentConfiguration(height=AGENT_HEIGHT, radius=AGENT_RADIUS, sensor_specifications=[])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with hs.Simulator(hs.Configuration(sim_cfg, [agent])) as sim:
        if not sim.recompute_navmesh(sim.pathfinder, agent_navmesh_settings(hs)):
            raise ValueError(f"scene mesh {glb}: habitat-sim could not compute a navmesh")
        with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
            staged = Path(tmp) / path.name
            if not sim.pathfinder.save_nav_mesh(str(staged)):
                raise OSError(f"navmesh {path}: habitat-sim could not write it")
            data = staged.read_bytes()
    with atomic_open(path) as f:
        f.write(data)
    return path


# ---------------------------------------------------------------------------------------- scenes and datasets
@dataclass
class ExportedScene:
    name: str
    glb: Path
    navmesh: Path | None
    """None where habitat-sim does not import (habitat-sim then computes the navmesh when it loads the scene)."""

    def summary(self) -> str:
        return f"scene {self.name}: {self.glb}" + (" (+ .navmesh)" if self.navmesh else "")


def habitat_imports() -> bool:
    from ddppo.sim.habitat_backend import HabitatUnavailable, require_habitat_sim

    try:
        require_habitat_sim()
    except HabitatUnavailable:
        return False
    return True


def _navmesh_here(log) -> bool:
    """Whether navmeshes can be computed here (habitat-sim imports); says so when not."""
    if habitat_imports():
        return True
    log("habitat-sim does not import here: no .navmesh written (habitat-sim computes one when it loads a scene)")
    return False


def export_scene(scene: Scene, out_dir: str | Path, navmesh: bool = True) -> ExportedScene:
    """``{out_dir}/{scene.name}.glb`` and, when ``navmesh``, the ``.navmesh`` beside it."""
    glb = write_glb(scene, Path(out_dir) / f"{scene.name}.glb")
    return ExportedScene(scene.name, glb, write_navmesh(glb, glb.with_suffix(".navmesh")) if navmesh else None)


def export_dataset(data_dir: str | Path, out_dir: str | Path, splits: list[str] | None = None,
                   navmesh: bool | None = None, log=print) -> list[ExportedScene]:
    """Export an embedded dataset for habitat-sim: every scene its ``splits`` use (default: every split it has) as
    ``{out}/{scene}.glb`` (+ ``.navmesh``), and each split's episodes as ``{out}/{split}/{split}.json.gz`` with
    ``scene_id`` = ``{scene}.glb``, relative to ``out``: ``task.data_dir=OUT task.scenes_dir=OUT
    sim.backend=habitat`` runs them. The scene files and geodesic fields are copied too (``{out}/scenes``,
    ``{out}/geodesic``), so ``OUT`` is also the same dataset for the embedded simulator. ``navmesh`` None: where
    habitat-sim imports."""
    from ddppo.sim.dataset_dir import SPLITS, episodes_path, geodesic_store_path, has_dataset, load_split

    data_dir, out = Path(data_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset directory {data_dir} does not exist")
    if out.resolve() == data_dir.resolve():
        raise ValueError(f"--out {out} is the dataset directory itself; export into another directory")
    splits = list(splits or [s for s in SPLITS if has_dataset(data_dir, s)])
    if not splits:
        raise FileNotFoundError(f"dataset directory {data_dir} has no split ({episodes_path(data_dir, 'val')} or "
                                "the like)")
    navmesh = _navmesh_here(log) if navmesh is None else navmesh
    exported: dict[str, ExportedScene] = {}
    for split in splits:
        episodes, navs = load_split(data_dir, split)
        for name, nav in navs.items():
            if name not in exported:
                exported[name] = export_scene(nav.scene, out, navmesh)
                save_scene(nav.scene, out / "scenes" / f"{name}.npz")
                log(exported[name].summary())
            _copy(geodesic_store_path(data_dir, split, name), geodesic_store_path(out, split, name))
        save_episodes_for_habitat(episodes, episodes_path(out, split))
        log(f"{split}: {len(episodes)} episodes in {episodes_path(out, split)}")
    return list(exported.values())


def save_episodes_for_habitat(episodes, path: Path) -> Path:
    """The episodes with ``scene_id`` = ``{scene}.glb``, the exported mesh, relative to the scenes directory."""
    from ddppo.sim.dataset import save_episodes, scene_name

    return save_episodes([dataclasses.replace(e, scene_id=f"{scene_name(e.scene_id)}.glb") for e in episodes], path)


def _copy(src: Path, dst: Path) -> None:
    if src.is_file():
        with open(src, "rb") as fin, atomic_open(dst) as fout:
            shutil.copyfileobj(fin, fout)


def export(source: str | Path, out_dir: str | Path, splits: list[str] | None = None, log=print
           ) -> list[ExportedScene]:
    """``ddppo scene export``: a scene file (``.npz``) or a dataset directory, to ``out_dir``; the navmesh is
    computed where habitat-sim imports."""
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist (expected a scene .npz or a dataset directory)")
    if source.is_dir():
        return export_dataset(source, out_dir, splits, log=log)
    if splits:
        raise ValueError(f"--split applies to a dataset directory; {source} is not one")
    scene = load_scene(source)
    done = export_scene(scene, out_dir, _navmesh_here(log))
    log(done.summary())
    return [done]
