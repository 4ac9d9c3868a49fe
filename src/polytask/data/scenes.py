"""Scenes: procedurally rendered indoor rooms with NYUv2's three tasks, on any CPU.

Every image is a room seen by a pinhole camera, ray cast at the pixel centres, so the three
targets are exact and consistent with each other: the class of the surface each pixel sees,
the depth of that surface (the camera-space ``z``, as NYUv2's depth maps hold) and its unit
normal in camera coordinates. The normals are those of the rendered surfaces, so they equal
the normals of the depth map's back-projected points up to discretisation (tested).

A room is an axis-aligned box (floor, walls, ceiling) with furniture: a cabinet against the
back wall, a table on four legs, maybe a ball, a lamp on the table and a picture on a wall.
The last three appear in only some rooms and are small, so some classes have few training
pixels: the setting of the cross-stitch paper's data-starved-class analysis (Misra et al.,
CVPR 2016, Fig. 9). The image is the shaded albedo of each surface under one point light,
with per-object colours drawn from overlapping palettes, textures and sensor noise, so that
colour alone does not give the class.

Conventions (those of the NYUv2 copies the MTAN code reads, REFERENCE section 1):

- camera frame: ``x`` right, ``y`` down, ``z`` forward (the viewing direction); the depth of
  a pixel is the ``z`` of the surface point it sees, in metres;
- normals: unit vectors in the camera frame, facing the camera;
- invalid pixels: where a surface is seen at a grazing angle (``|cos| < 0.08``, where a
  depth sensor returns nothing) depth is 0 and the normal all-zero; pixels on the boundary
  between two objects are labelled -1 (void), as NYUv2's unlabelled outlines.

Everything is a function of ``(seed, split, index)``: image ``i`` of a split is the same
whatever the split's size, and the same seed gives the same bytes.
:func:`write_scenes` writes a data set to disk in the NYUv2 layout
(``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy``), which the ``nyuv2`` data set reads.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
import torch

from ..errors import ConfigError
from ..options import SAMPLES, Limit, values_budget
from ._options import check_int
from .augment import DenseMaps, RandomScaleCropFlip
from .base import DATASETS, DataBundle
from .nyuv2_tasks import nyuv2_tasks
from .tensor import TensorMTLDataset

__all__ = [
    "CLASSES",
    "Frame",
    "ScenesDataset",
    "backproject_normals",
    "render",
    "render_split",
    "scenes",
    "write_scenes",
]

CLASSES = ("floor", "wall", "ceiling", "cabinet", "table", "ball", "lamp", "picture")
"""Class names, by index."""

FLOOR, WALL, CEILING, CABINET, TABLE, BALL, LAMP, PICTURE = range(len(CLASSES))

VOID = -1
GRAZING_COS = 0.08
"""Surfaces seen at a smaller ``|cos|`` between normal and ray have no depth (0) and normal."""

FOCAL = 0.8
"""Focal length in units of the image width (NYUv2's Kinect: about 0.81)."""

_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}

FloatArray = npt.NDArray[np.float64]


@dataclass
class Frame:
    """One rendered view: ``image`` (H, W, 3) in [0, 1], ``label`` (H, W) in -1..7,
    ``depth`` (H, W) in metres (0 = invalid), ``normal`` (H, W, 3) unit or all-zero, and the
    ``instance`` id (H, W) of the surface each pixel sees: one per face of the room and per
    (primitive, dominant normal axis and sign), so that depth is smooth within an instance
    (for tests and analysis)."""

    image: npt.NDArray[np.float32]
    label: npt.NDArray[np.int64]
    depth: npt.NDArray[np.float32]
    normal: npt.NDArray[np.float32]
    instance: npt.NDArray[np.int64]


# -- ray-primitive intersections (vectorised over rays; inf where missed) -------------------


def _hit_box(
    origin: FloatArray, dirs: FloatArray, lo: FloatArray, hi: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """Nearest entry of rays into an axis-aligned box from outside: distances and normals."""
    with np.errstate(divide="ignore", invalid="ignore"):
        inv = 1.0 / dirs
        t1 = (lo - origin) * inv
        t2 = (hi - origin) * inv
    near = np.where(np.isnan(t1), -np.inf, np.minimum(t1, t2))
    far = np.where(np.isnan(t1), np.inf, np.maximum(t1, t2))
    t_near = near.max(axis=1)
    t_far = far.min(axis=1)
    hit = (t_near <= t_far) & (t_near > 1e-6)
    t = np.where(hit, t_near, np.inf)
    axis = near.argmax(axis=1)
    normal = np.zeros_like(dirs)
    rows = np.arange(len(dirs))
    normal[rows, axis] = -np.sign(dirs[rows, axis])
    return t, normal


def _hit_sphere(
    origin: FloatArray, dirs: FloatArray, centre: FloatArray, radius: float
) -> tuple[FloatArray, FloatArray]:
    oc = origin - centre
    a = (dirs * dirs).sum(axis=1)
    b = 2.0 * (dirs @ oc)
    c = float(oc @ oc) - radius * radius
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore"):
        t = (-b - np.sqrt(disc)) / (2 * a)
    t = np.where((disc >= 0) & (t > 1e-6), t, np.inf)
    points = origin + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
    return t, (points - centre) / radius


def _hit_cylinder(
    origin: FloatArray, dirs: FloatArray, base: FloatArray, radius: float, height: float
) -> tuple[FloatArray, FloatArray]:
    """A closed vertical cylinder standing on ``base`` (its top cap is the only visible one)."""
    ox, oz = origin[0] - base[0], origin[2] - base[2]
    dx, dz = dirs[:, 0], dirs[:, 2]
    a = dx * dx + dz * dz
    b = 2 * (ox * dx + oz * dz)
    c = ox * ox + oz * oz - radius * radius
    disc = b * b - 4 * a * c
    with np.errstate(invalid="ignore", divide="ignore"):
        t_side = (-b - np.sqrt(disc)) / (2 * a)
    y_side = origin[1] + t_side * dirs[:, 1]
    side_ok = (disc >= 0) & (t_side > 1e-6) & (y_side >= base[1]) & (y_side <= base[1] + height)
    t_side = np.where(side_ok, t_side, np.inf)
    top = base[1] + height
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cap = (top - origin[1]) / dirs[:, 1]
    px = ox + t_cap * dx
    pz = oz + t_cap * dz
    cap_ok = (t_cap > 1e-6) & (px * px + pz * pz <= radius * radius) & (dirs[:, 1] < 0)
    t_cap = np.where(cap_ok, t_cap, np.inf)
    t = np.minimum(t_side, t_cap)
    points = origin + np.where(np.isfinite(t), t, 0.0)[:, None] * dirs
    side_normal = np.stack(
        [points[:, 0] - base[0], np.zeros(len(dirs)), points[:, 2] - base[2]], axis=1
    ) / max(radius, 1e-12)
    cap_normal = np.broadcast_to(np.array([0.0, 1.0, 0.0]), dirs.shape)
    normal = np.where((t_cap < t_side)[:, None], cap_normal, side_normal)
    return t, normal


def _hit_room(origin: FloatArray, dirs: FloatArray, size: FloatArray) -> tuple[FloatArray, ...]:
    """Exit of rays from inside the room ``[-sx, sx] x [0, sy] x [0, sz]``: t, normal, class."""
    lo = np.array([-size[0], 0.0, 0.0])
    hi = size
    with np.errstate(divide="ignore", invalid="ignore"):
        t_hi = (hi - origin) / dirs
        t_lo = (lo - origin) / dirs
    t_axis = np.where(dirs > 0, t_hi, np.where(dirs < 0, t_lo, np.inf))
    axis = t_axis.argmin(axis=1)
    rows = np.arange(len(dirs))
    t = t_axis[rows, axis]
    normal = np.zeros_like(dirs)
    normal[rows, axis] = -np.sign(dirs[rows, axis])  # pointing back into the room
    cls = np.full(len(dirs), WALL)
    cls[(axis == 1) & (dirs[:, 1] < 0)] = FLOOR
    cls[(axis == 1) & (dirs[:, 1] > 0)] = CEILING
    face = 2 * axis + (dirs[rows, axis] > 0)  # each of the six faces its own surface
    return t, normal, cls, face


# -- the scene ------------------------------------------------------------------------------


@dataclass
class _Primitive:
    cls: int
    kind: str  # "box", "sphere", "cylinder"
    params: tuple[Any, ...]
    colour: FloatArray
    texture: str  # "plain", "stripes", "checker", "grain"


_PALETTES: dict[int, tuple[tuple[float, float, float], float]] = {
    # class: (mean RGB, spread): overlapping on purpose, so colour alone does not decide
    FLOOR: ((0.55, 0.42, 0.30), 0.15),
    WALL: ((0.75, 0.72, 0.66), 0.15),
    CEILING: ((0.85, 0.85, 0.82), 0.08),
    CABINET: ((0.50, 0.38, 0.28), 0.20),
    TABLE: ((0.60, 0.45, 0.32), 0.20),
    BALL: ((0.60, 0.35, 0.35), 0.35),
    LAMP: ((0.80, 0.78, 0.60), 0.20),
    PICTURE: ((0.45, 0.50, 0.55), 0.30),
}


def _colour(rng: np.random.Generator, cls: int) -> FloatArray:
    mean, spread = _PALETTES[cls]
    return np.clip(np.array(mean) + rng.uniform(-spread, spread, 3), 0.05, 0.95)


def _scene(rng: np.random.Generator) -> tuple[FloatArray, list[_Primitive], dict[str, Any]]:
    """Room size, its furniture and the room's own colours and textures."""
    size = np.array([rng.uniform(1.6, 2.8), rng.uniform(2.5, 3.0), rng.uniform(3.5, 5.5)])
    prims: list[_Primitive] = []
    # a cabinet against the back wall
    w, h, d = rng.uniform(0.8, 1.8), rng.uniform(0.8, 2.0), rng.uniform(0.35, 0.6)
    x = rng.uniform(-size[0] + w / 2, size[0] - w / 2)
    prims.append(
        _Primitive(
            CABINET,
            "box",
            (np.array([x - w / 2, 0.0, size[2] - d]), np.array([x + w / 2, h, size[2]])),
            _colour(rng, CABINET),
            str(rng.choice(["plain", "grain"])),
        )
    )
    # a table: a top on four legs
    tw, td, th = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0), rng.uniform(0.65, 0.8)
    tx = rng.uniform(-size[0] + tw / 2 + 0.1, size[0] - tw / 2 - 0.1)
    tz = rng.uniform(1.5, size[2] - d - td / 2 - 0.2)
    table_colour = _colour(rng, TABLE)
    top = 0.05
    prims.append(
        _Primitive(
            TABLE,
            "box",
            (
                np.array([tx - tw / 2, th - top, tz - td / 2]),
                np.array([tx + tw / 2, th, tz + td / 2]),
            ),
            table_colour,
            "grain",
        )
    )
    leg = 0.06
    for sx in (-1, 1):
        for sz in (-1, 1):
            lx = tx + sx * (tw / 2 - leg)
            lz = tz + sz * (td / 2 - leg)
            prims.append(
                _Primitive(
                    TABLE,
                    "box",
                    (
                        np.array([lx - leg / 2, 0.0, lz - leg / 2]),
                        np.array([lx + leg / 2, th - top, lz + leg / 2]),
                    ),
                    table_colour,
                    "plain",
                )
            )
    if rng.random() < 0.7:  # a ball on the floor, beside the table
        r = rng.uniform(0.2, 0.45)
        bx = rng.uniform(-size[0] + r, size[0] - r)
        bz = rng.uniform(1.2, size[2] - d - r)
        if abs(bx - tx) < tw / 2 + r and abs(bz - tz) < td / 2 + r:
            bx = tx + (tw / 2 + r + 0.05) * (1 if bx >= tx else -1)
            bx = float(np.clip(bx, -size[0] + r, size[0] - r))
        prims.append(
            _Primitive(BALL, "sphere", (np.array([bx, r, bz]), r), _colour(rng, BALL), "stripes")
        )
    if rng.random() < 0.5:  # a lamp on the table
        r, h_lamp = rng.uniform(0.1, 0.18), rng.uniform(0.35, 0.7)
        lx = tx + rng.uniform(-tw / 2 + r, tw / 2 - r)
        lz = tz + rng.uniform(-td / 2 + r, td / 2 - r)
        prims.append(
            _Primitive(
                LAMP,
                "cylinder",
                (np.array([lx, th, lz]), r, h_lamp),
                _colour(rng, LAMP),
                "plain",
            )
        )
    if rng.random() < 0.6:  # a picture on the back or a side wall
        pw, ph, thick = rng.uniform(0.6, 1.2), rng.uniform(0.5, 0.9), 0.03
        py = rng.uniform(1.3, min(2.2, size[1] - ph / 2 - 0.05))
        if rng.random() < 0.5:
            px = rng.uniform(-size[0] + pw / 2, size[0] - pw / 2)
            lo = np.array([px - pw / 2, py - ph / 2, size[2] - thick])
            hi = np.array([px + pw / 2, py + ph / 2, size[2]])
            if h > py - ph / 2 and abs(px - x) < (pw + w) / 2:  # behind the cabinet: move up
                lo[1], hi[1] = h + 0.05, h + 0.05 + ph
        else:
            side = rng.choice([-1.0, 1.0])
            pz = rng.uniform(1.2 + pw / 2, max(1.2 + pw / 2, size[2] - pw / 2 - 0.7))
            wall_x = side * size[0]
            lo = np.array([min(wall_x, wall_x - side * thick), py - ph / 2, pz - pw / 2])
            hi = np.array([max(wall_x, wall_x - side * thick), py + ph / 2, pz + pw / 2])
        if hi[1] < size[1]:
            prims.append(_Primitive(PICTURE, "box", (lo, hi), _colour(rng, PICTURE), "checker"))
    room = {
        "colours": {c: _colour(rng, c) for c in (FLOOR, WALL, CEILING)},
        "light": np.array(
            [rng.uniform(-0.5, 0.5) * size[0], size[1] - 0.1, rng.uniform(0.3, 0.7) * size[2]]
        ),
        "texture_scale": rng.uniform(4.0, 9.0),
    }
    return size, prims, room


def _camera(
    rng: np.random.Generator, size: FloatArray
) -> tuple[FloatArray, npt.NDArray[np.float64]]:
    """Camera position and the rotation from camera (x right, y down, z forward) to world."""
    position = np.array([rng.uniform(-0.4, 0.4) * size[0], rng.uniform(1.1, 1.7), 0.15])
    yaw = np.radians(rng.uniform(-20, 20))
    pitch = np.radians(rng.uniform(-25, 0))  # level or looking down a little
    flip = np.diag([1.0, -1.0, 1.0])  # camera y points down, world y up
    cy, sy = np.cos(yaw), np.sin(yaw)
    cp, sp = np.cos(pitch), np.sin(pitch)
    r_yaw = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_pitch = np.array([[1, 0, 0], [0, cp, sp], [0, -sp, cp]])
    return position, r_yaw @ r_pitch @ flip


def _rays(height: int, width: int) -> FloatArray:
    """Camera-frame ray directions with unit ``z`` for every pixel centre, row-major."""
    f = FOCAL * width
    v, u = np.meshgrid(np.arange(height) + 0.5, np.arange(width) + 0.5, indexing="ij")
    dirs = np.stack([(u - width / 2) / f, (v - height / 2) / f, np.ones_like(u)], axis=-1)
    return dirs.reshape(-1, 3)


def _texture(kind: str, points: FloatArray, scale: float) -> FloatArray:
    shade: FloatArray
    if kind == "stripes":
        shade = 0.75 + 0.25 * np.sign(np.sin(points[:, 1] * scale * 4))
    elif kind == "checker":
        shade = 0.55 + 0.45 * (np.floor(points * scale * 2).sum(axis=1) % 2)
    elif kind == "grain":
        shade = 0.85 + 0.15 * np.sin(points[:, 0] * scale * 3 + np.sin(points[:, 2] * scale))
    else:
        shade = np.ones(len(points))
    return shade


def render(seed: int, split: str, index: int, height: int, width: int) -> Frame:
    """Render image ``index`` of ``split`` for ``seed`` at ``height`` x ``width`` pixels."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    size, prims, room = _scene(rng)
    position, rotation = _camera(rng, size)
    cam_dirs = _rays(height, width)
    dirs = cam_dirs @ rotation.T
    t, normal, cls, instance = _hit_room(position, dirs, size)  # faces are instances 0..5
    colour = np.stack([room["colours"][int(c)] for c in (FLOOR, WALL, CEILING)])[cls]
    texture = np.where(cls == FLOOR, 1, 0)  # floor boards
    for k, prim in enumerate(prims):
        if prim.kind == "box":
            t_k, n_k = _hit_box(position, dirs, *prim.params)
        elif prim.kind == "sphere":
            t_k, n_k = _hit_sphere(position, dirs, *prim.params)
        else:
            t_k, n_k = _hit_cylinder(position, dirs, *prim.params)
        closer = t_k < t
        t = np.where(closer, t_k, t)
        normal = np.where(closer[:, None], n_k, normal)
        cls = np.where(closer, prim.cls, cls)
        # one instance per (primitive, face): depth is smooth within an instance
        major = np.abs(n_k).argmax(axis=1)
        face = 2 * major + (n_k[np.arange(len(n_k)), major] > 0)
        instance = np.where(closer, 6 + 6 * k + face, instance)
        colour = np.where(closer[:, None], prim.colour, colour)
        texture = np.where(closer, 2 + k, texture)
    points = position + t[:, None] * dirs
    # shading: albedo x texture x (ambient + diffuse from a point light), plus noise
    shade = np.ones(len(t))
    floor = texture == 1
    shade[floor] = 0.8 + 0.2 * np.sign(np.sin(points[floor, 0] * room["texture_scale"] * 2))
    for k, prim in enumerate(prims):
        sel = texture == 2 + k
        if sel.any():
            shade[sel] = _texture(prim.texture, points[sel], room["texture_scale"])
    to_light = room["light"] - points
    dist = np.linalg.norm(to_light, axis=1)
    diffuse = np.clip((normal * to_light).sum(axis=1) / dist, 0.0, None)
    light = 0.35 + 0.9 * diffuse / (1.0 + 0.05 * dist * dist)
    image = colour * (shade * light)[:, None]
    image = image + rng.normal(0.0, 0.02, image.shape)
    image = np.clip(image, 0.0, 1.0)
    # targets in the camera frame
    depth = t * cam_dirs[:, 2]  # cam_dirs have unit z: depth is the ray parameter
    cam_normal = normal @ rotation  # world -> camera: R^T n, row-vector form
    cos = np.abs((cam_normal * cam_dirs).sum(axis=1)) / np.linalg.norm(cam_dirs, axis=1)
    valid = cos >= GRAZING_COS
    depth = np.where(valid, depth, 0.0)
    cam_normal = np.where(valid[:, None], cam_normal, 0.0)
    label = cls.reshape(height, width)
    inst = instance.reshape(height, width)
    boundary = np.zeros_like(inst, dtype=bool)
    boundary[:, 1:] |= inst[:, 1:] != inst[:, :-1]
    boundary[:, :-1] |= inst[:, 1:] != inst[:, :-1]
    boundary[1:, :] |= inst[1:, :] != inst[:-1, :]
    boundary[:-1, :] |= inst[1:, :] != inst[:-1, :]
    # void only where different classes meet (the outline of an object, not the floor seams)
    cls_map = label
    class_edge = np.zeros_like(boundary)
    class_edge[:, 1:] |= cls_map[:, 1:] != cls_map[:, :-1]
    class_edge[:, :-1] |= cls_map[:, 1:] != cls_map[:, :-1]
    class_edge[1:, :] |= cls_map[1:, :] != cls_map[:-1, :]
    class_edge[:-1, :] |= cls_map[1:, :] != cls_map[:-1, :]
    label = np.where(boundary & class_edge, VOID, label)
    return Frame(
        image=image.reshape(height, width, 3).astype(np.float32),
        label=label.astype(np.int64),
        depth=depth.reshape(height, width).astype(np.float32),
        normal=cam_normal.reshape(height, width, 3).astype(np.float32),
        instance=inst.astype(np.int64),
    )


def backproject_normals(depth: FloatArray, width: int | None = None) -> FloatArray:
    """Unit normals of a depth map's back-projected surface by central differences.

    ``depth`` is (H, W) in the camera of :func:`render` (focal length ``FOCAL * W``, principal
    point at the image centre). Returns (H, W, 3), camera frame, facing the camera; the
    border rows and columns are zero.
    """
    height, w = depth.shape
    width = w if width is None else width
    points = (_rays(height, width) * depth.reshape(-1, 1)).reshape(height, width, 3)
    du = np.zeros_like(points)
    dv = np.zeros_like(points)
    du[:, 1:-1] = points[:, 2:] - points[:, :-2]
    dv[1:-1, :] = points[2:, :] - points[:-2, :]
    n = np.cross(du, dv)
    norm = np.linalg.norm(n, axis=-1, keepdims=True)
    n = np.divide(n, norm, out=np.zeros_like(n), where=norm > 0)
    facing = (n * points).sum(axis=-1, keepdims=True) > 0
    n = np.where(facing, -n, n)
    n[[0, -1], :] = 0
    n[:, [0, -1]] = 0
    result: FloatArray = n
    return result


# -- data set ------------------------------------------------------------------------------


@functools.lru_cache(maxsize=6)
def render_split(seed: int, split: str, n: int, height: int, width: int) -> dict[str, torch.Tensor]:
    """``n`` frames of a split as tensors: ``image`` [n, 3, H, W], ``label`` [n, H, W] int64,
    ``depth`` [n, 1, H, W], ``normal`` [n, 3, H, W].

    The last few splits are kept in memory (a comparison grid builds the same data for every
    run); the tensors are shared, so never modify them in place.
    """
    frames = [render(seed, split, i, height, width) for i in range(n)]

    def stack(name: str) -> torch.Tensor:
        return torch.from_numpy(np.stack([getattr(f, name) for f in frames]))

    return {
        "image": stack("image").permute(0, 3, 1, 2).contiguous(),
        "label": stack("label"),
        "depth": stack("depth")[:, None].contiguous(),
        "normal": stack("normal").permute(0, 3, 1, 2).contiguous(),
    }


class ScenesDataset(TensorMTLDataset):
    """One split of Scenes in memory; ``augment`` applies the reference augmentation."""

    def __init__(self, arrays: dict[str, torch.Tensor], *, augment: bool = False) -> None:
        super().__init__(
            arrays["image"],
            {"semantic": arrays["label"], "depth": arrays["depth"], "normal": arrays["normal"]},
        )
        self.augment = augment

    def __getitem__(self, index: int) -> dict[str, Any]:
        sample = super().__getitem__(index)
        if self.augment:
            t = sample["targets"]
            maps = _AUGMENT(DenseMaps(sample["input"], t["semantic"], t["depth"], t["normal"]))
            assert maps.normal is not None
            sample = {
                "input": maps.image,
                "targets": {"semantic": maps.label, "depth": maps.depth, "normal": maps.normal},
            }
        return sample


_AUGMENT = RandomScaleCropFlip()


@DATASETS.register(
    "scenes",
    limits={
        "n_train": SAMPLES,
        "n_val": SAMPLES,
        "n_test": SAMPLES,
        "height": Limit(ge=32, le=1024),
        "width": Limit(ge=32, le=1024),
    },
    # an RGB image, a segmentation, a depth map and normals: 8 values per pixel
    budgets=[values_budget(lambda o: 8 * o["height"] * o["width"], "height", "width")],
)
def scenes(
    *,
    n_train: int = 600,
    n_val: int = 200,
    n_test: int = 200,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    augment: bool = False,
    metric_protocol: Literal["dataset", "per_batch"] = "dataset",
) -> DataBundle:
    """Rendered rooms with NYUv2's tasks ``semantic`` (8 classes), ``depth`` and ``normal``.

    Args:
        n_train, n_val, n_test: images per split (>= 1); the splits are rendered from
            independent random streams, so no room is in two splits.
        height, width: image size in pixels (>= 32 each: SegNet pools five times).
        seed: the data set's seed (>= 0); the same seed gives the same bytes.
        augment: the reference augmentation (random scale-crop, flip) on the train split.
        metric_protocol: ``dataset`` (exact whole-split depth and normal metrics) or
            ``per_batch`` (the reference's per-batch averages).

    ``info["class_pixels"]`` holds the number of labelled training pixels of every class and
    ``info["class_names"]`` their names.

    Example:
        >>> bundle = scenes(n_train=4, n_val=2, n_test=2, height=32, width=40)
        >>> sample = bundle.train[0]
        >>> sample["input"].shape, sorted(sample["targets"])
        (torch.Size([3, 32, 40]), ['depth', 'normal', 'semantic'])
    """
    sizes = {
        "train": check_int("n_train", n_train, 1),
        "val": check_int("n_val", n_val, 1),
        "test": check_int("n_test", n_test, 1),
    }
    height = check_int("height", height, 32)
    width = check_int("width", width, 32)
    seed = check_int("seed", seed, 0)
    if not isinstance(augment, bool):
        raise ConfigError(f"Expected option `augment` to be true or false, found {augment!r}.")
    if metric_protocol not in ("dataset", "per_batch"):
        raise ConfigError(
            f"Expected option `metric_protocol` to be 'dataset' or 'per_batch', "
            f"found {metric_protocol!r}."
        )
    arrays = {split: render_split(seed, split, n, height, width) for split, n in sizes.items()}
    labels = arrays["train"]["label"]
    class_pixels = torch.bincount(labels[labels >= 0], minlength=len(CLASSES)).tolist()
    tasks = nyuv2_tasks(len(CLASSES), metric_protocol)
    return DataBundle(
        tasks=tasks,
        train=ScenesDataset(arrays["train"], augment=augment),
        val=ScenesDataset(arrays["val"]),
        test=ScenesDataset(arrays["test"]),
        input_shape=(3, height, width),
        info={
            "source": "polytask Scenes (procedurally rendered)",
            "seed": seed,
            "sizes": sizes,
            "image_size": [height, width],
            "num_classes": len(CLASSES),
            "class_names": list(CLASSES),
            "class_pixels": class_pixels,
            "augment": augment,
        },
    )


def write_scenes(
    root: str | Path,
    *,
    n_train: int = 600,
    n_test: int = 200,
    height: int = 48,
    width: int = 64,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    """Write Scenes in the NYUv2 layout: ``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy``.

    ``train`` holds the train split, ``val`` the test split (NYUv2's published ``val`` is the
    papers' test split). Arrays are stored as NYUv2's are: image (H, W, 3) in [0, 1], label
    (H, W) with -1 = void, depth (H, W, 1) with 0 = invalid, normal (H, W, 3), all of
    ``dtype``. Returns ``root``.
    """
    root = Path(root)
    for folder, split, n in (("train", "train", n_train), ("val", "test", n_test)):
        for modality in ("image", "label", "depth", "normal"):
            (root / folder / modality).mkdir(parents=True, exist_ok=True)
        for i in range(check_int(f"n_{split}", n, 1)):
            frame = render(seed, split, i, height, width)
            arrays: Sequence[tuple[str, npt.NDArray[Any]]] = (
                ("image", frame.image),
                ("label", frame.label),
                ("depth", frame.depth[..., None]),
                ("normal", frame.normal),
            )
            for modality, array in arrays:
                np.save(root / folder / modality / f"{i}.npy", array.astype(dtype))
    return root
