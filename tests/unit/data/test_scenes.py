"""Scenes: consistent targets (normals of the rendered depth), determinism, the NYUv2 layout."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from polytask.data import DATASETS
from polytask.data.nyuv2 import nyuv2
from polytask.data.scenes import (
    CLASSES,
    GRAZING_COS,
    backproject_normals,
    render,
    render_split,
    scenes,
    write_scenes,
)
from polytask.errors import ConfigError

PLANAR = [CLASSES.index(c) for c in ("floor", "wall", "ceiling", "cabinet", "table", "picture")]


def _interior(frame_instance: np.ndarray, depth: np.ndarray) -> np.ndarray:
    """Pixels whose 4-neighbours see the same surface, all with a valid depth."""
    inst, ok = frame_instance, np.zeros(depth.shape, bool)
    c = inst[1:-1, 1:-1]
    same = (c == inst[:-2, 1:-1]) & (c == inst[2:, 1:-1])
    same &= (c == inst[1:-1, :-2]) & (c == inst[1:-1, 2:])
    valid = depth > 0
    v = valid[1:-1, 1:-1] & valid[:-2, 1:-1] & valid[2:, 1:-1]
    v &= valid[1:-1, :-2] & valid[1:-1, 2:]
    ok[1:-1, 1:-1] = same & v
    return ok


def _normal_errors(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """Angles (degrees) between the stored normals and the central-difference normals of the
    back-projected depth, inside planar and inside curved surfaces, over ten rooms."""
    planar, curved = [], []
    for i in range(10):
        frame = render(7, "train", i, height, width)
        fd = backproject_normals(frame.depth.astype(np.float64))
        angle = np.degrees(np.arccos(np.clip((fd * frame.normal).sum(-1), -1, 1)))
        inside = _interior(frame.instance, frame.depth)
        is_planar = np.isin(frame.label, PLANAR)
        planar.append(angle[inside & is_planar])
        curved.append(angle[inside & ~is_planar & (frame.label >= 0)])
    return np.concatenate(planar), np.concatenate(curved)


def test_normals_are_the_normals_of_the_rendered_depth() -> None:
    """Tolerance: on planar surfaces (room, boxes) within 0.05 degrees everywhere (float32
    depth rounding). On curved ones (ball, lamp) the central difference spans two pixels of
    the curve: at 96 x 128 the median is below 0.5 degrees and 90 % below 2 degrees, and the
    mean error shrinks at least 1.6-fold when the resolution doubles (first order in the
    pixel size, as a discretisation error must)."""
    flat, round_ = _normal_errors(96, 128)
    assert flat.size > 50_000 and round_.size > 500
    assert flat.max() < 0.05
    assert np.median(round_) < 0.5
    assert np.percentile(round_, 90) < 2.0
    flat_fine, round_fine = _normal_errors(192, 256)
    assert flat_fine.max() < 0.05
    assert round_fine.mean() < round_.mean() / 1.6


def test_targets_are_consistent_and_in_range() -> None:
    frame = render(0, "val", 3, 40, 56)
    assert frame.image.shape == (40, 56, 3) and frame.image.dtype == np.float32
    assert frame.image.min() >= 0.0 and frame.image.max() <= 1.0
    assert set(np.unique(frame.label)) <= set(range(-1, len(CLASSES)))
    valid = frame.depth > 0
    norms = np.linalg.norm(frame.normal, axis=-1)
    np.testing.assert_allclose(norms[valid], 1.0, atol=1e-5)
    assert np.all(frame.normal[~valid] == 0)
    # normals face the camera: negative dot product with the viewing ray at every valid pixel
    v, u = np.meshgrid(np.arange(40) + 0.5, np.arange(56) + 0.5, indexing="ij")
    rays = np.stack([u - 28, v - 20, np.full_like(u, 0.8 * 56)], axis=-1)
    cos = (frame.normal * rays).sum(-1) / np.linalg.norm(rays, axis=-1)
    assert np.all(cos[valid] <= -GRAZING_COS + 1e-5)
    # void (-1) only on outlines between classes
    void = frame.label == -1
    assert 0 < void.mean() < 0.2


def test_same_seed_same_bytes_across_processes() -> None:
    def digest(seed: int) -> str:
        frame = render(seed, "train", 5, 32, 48)
        h = hashlib.sha256()
        for array in (frame.image, frame.label, frame.depth, frame.normal):
            h.update(array.tobytes())
        return h.hexdigest()

    code = (
        "import hashlib; from polytask.data.scenes import render; "
        "f = render(11, 'train', 5, 32, 48); h = hashlib.sha256(); "
        "[h.update(a.tobytes()) for a in (f.image, f.label, f.depth, f.normal)]; "
        "print(h.hexdigest())"
    )
    other = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.strip()
    assert digest(11) == other == digest(11)
    assert digest(12) != digest(11)


def test_an_image_does_not_depend_on_the_split_size() -> None:
    small = render_split(4, "test", 2, 32, 40)
    large = render_split(4, "test", 5, 32, 40)
    for name in small:
        assert torch.equal(small[name], large[name][:2])
    frame = render(4, "test", 1, 32, 40)
    assert torch.equal(large["label"][1], torch.from_numpy(frame.label))
    assert torch.equal(large["normal"][1], torch.from_numpy(frame.normal).permute(2, 0, 1))


def test_bundle_tasks_splits_and_class_pixels() -> None:
    bundle = DATASETS.get("scenes")(n_train=12, n_val=3, n_test=4, height=32, width=48, seed=2)
    assert list(bundle.tasks) == ["semantic", "depth", "normal"]
    assert bundle.tasks["semantic"].output_dim == len(CLASSES)
    assert (len(bundle.train), len(bundle.val), len(bundle.test)) == (12, 3, 4)
    assert bundle.input_shape == (3, 32, 48)
    sample = bundle.train[0]
    assert sample["input"].shape == (3, 32, 48) and sample["input"].dtype == torch.float32
    assert sample["targets"]["semantic"].dtype == torch.int64
    assert sample["targets"]["depth"].shape == (1, 32, 48)
    labels = torch.stack([bundle.train[i]["targets"]["semantic"] for i in range(12)])
    naive = [int((labels == c).sum()) for c in range(len(CLASSES))]
    assert bundle.info["class_pixels"] == naive
    assert bundle.info["class_names"] == list(CLASSES)
    # splits are different rooms
    assert not torch.equal(bundle.train[0]["input"], bundle.test[0]["input"])


def test_some_classes_are_data_starved() -> None:
    bundle = scenes(n_train=60, n_val=1, n_test=1, height=48, width=64)
    pixels = np.array(bundle.info["class_pixels"], dtype=float)
    share = pixels / pixels.sum()
    assert np.all(pixels > 0)  # every class occurs
    assert (share < 0.02).sum() >= 3  # and several are rare
    assert share.max() > 0.3


def test_augmentation_keeps_shapes_and_is_seeded() -> None:
    bundle = scenes(n_train=3, n_val=1, n_test=1, height=32, width=48, augment=True)
    torch.manual_seed(0)
    first = bundle.train[1]
    torch.manual_seed(0)
    again = bundle.train[1]
    for name, value in first["targets"].items():
        assert torch.equal(value, again["targets"][name])
        assert value.shape == bundle.test[0]["targets"][name].shape
    assert not bundle.val.augment and not bundle.test.augment  # only training is augmented


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"n_train": 0}, "n_train"),
        ({"height": 16}, "height"),
        ({"seed": -1}, "seed"),
        ({"augment": "yes"}, "augment"),
        ({"metric_protocol": "batch"}, "metric_protocol"),
    ],
)
def test_bad_options(options: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        scenes(**options)  # type: ignore[arg-type]


def test_written_layout_is_read_back_by_the_nyuv2_reader(tmp_path: Path) -> None:
    root = write_scenes(tmp_path / "scenes", n_train=3, n_test=2, height=32, width=40, seed=5)
    names = sorted(p.name for p in (root / "train").iterdir())
    assert names == ["depth", "image", "label", "normal"]
    bundle = nyuv2(root=str(root))
    assert (len(bundle.train), len(bundle.test)) == (3, 2)
    assert bundle.input_shape == (3, 32, 40)
    rendered = render_split(5, "train", 3, 32, 40)
    sample = bundle.train[2]
    assert torch.equal(sample["input"], rendered["image"][2])
    assert torch.equal(sample["targets"]["semantic"], rendered["label"][2])
    assert torch.equal(sample["targets"]["depth"], rendered["depth"][2])
    assert torch.equal(sample["targets"]["normal"], rendered["normal"][2])
    test = render_split(5, "test", 2, 32, 40)
    assert torch.equal(bundle.test[1]["targets"]["normal"], test["normal"][1])
