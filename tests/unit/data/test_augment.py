"""The joint scale / crop / flip augmentation, pinned on constructed maps.

The maps encode where every pixel comes from: the label is ``y * W + x``, the depth
``1 + y * W + x``, the image channels are the row, the column and ``y + 2x`` (linear, so
bilinear sampling reproduces them exactly) and the normals a linear field. After the
transform every value says which source coordinate it was sampled at.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import dense_layout as dl
from polytask.data.augment import (
    REFERENCE_SCALES,
    DenseMaps,
    RandomScaleCropFlip,
    ScaleCropFlip,
    crop_size,
    scale_crop_flip,
)
from polytask.data.loading import JOINT, epoch_schedule, iterate_batches
from polytask.data.nyuv2 import nyuv2

H, W = 10, 15


def encoded_maps(normals: bool = True) -> DenseMaps:
    y = torch.arange(H, dtype=torch.float32)[:, None].expand(H, W)
    x = torch.arange(W, dtype=torch.float32)[None, :].expand(H, W)
    position = torch.arange(H * W).reshape(H, W)
    normal = torch.stack([0.1 * x, -0.05 * y, torch.ones(H, W)]) if normals else None
    return DenseMaps(
        image=torch.stack([y, x, y + 2 * x]),
        label=position,
        depth=(1.0 + position.to(torch.float32))[None],
        normal=normal,
    )


def source_rows_cols(scale: float, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where nearest sampling reads: row ``top + floor(Y h / H)``, column likewise."""
    h, w = crop_size(H, W, scale)
    rows = top + torch.div(torch.arange(H) * h, H, rounding_mode="floor")
    cols = left + torch.div(torch.arange(W) * w, W, rounding_mode="floor")
    return rows, cols


def bilinear_coordinates(scale: float, top: int, left: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where bilinear sampling with align_corners=True reads: ``top + Y (h - 1) / (H - 1)``."""
    h, w = crop_size(H, W, scale)
    rows = top + torch.arange(H, dtype=torch.float64) * (h - 1) / (H - 1)
    cols = left + torch.arange(W, dtype=torch.float64) * (w - 1) / (W - 1)
    return rows, cols


CASES = [
    (1.2, 0, 0),
    (1.2, 2, 3),
    (1.5, 4, 5),
    (1.5, 1, 0),
    (1.0, 0, 0),
    (2.5, 3, 7),
]


def test_crop_sizes_are_the_integer_parts() -> None:
    assert crop_size(288, 384, 1.2) == (240, 320)
    assert crop_size(288, 384, 1.5) == (192, 256)
    assert crop_size(128, 256, 1.2) == (106, 213)
    assert crop_size(128, 256, 1.5) == (85, 170)
    assert crop_size(H, W, 1.2) == (8, 12)


def test_a_hand_computed_example() -> None:
    image = torch.arange(16.0).reshape(1, 4, 4).expand(3, 4, 4)
    label = torch.arange(16).reshape(4, 4)
    maps = DenseMaps(image, label, 2.0 * (1.0 + label.float())[None])
    out = scale_crop_flip(maps, scale=2.0, top=1, left=2, flip=False)
    third = 1 / 3
    expected_image = [
        [6.0, 6 + third, 6 + 2 * third, 7.0],
        [7 + third, 7 + 2 * third, 8.0, 8 + third],
        [8 + 2 * third, 9.0, 9 + third, 9 + 2 * third],
        [10.0, 10 + third, 10 + 2 * third, 11.0],
    ]
    torch.testing.assert_close(out.image[0], torch.tensor(expected_image))
    expected_label = [[6, 6, 7, 7], [6, 6, 7, 7], [10, 10, 11, 11], [10, 10, 11, 11]]
    assert out.label.tolist() == expected_label
    assert out.depth[0].tolist() == [[float(v + 1) for v in row] for row in expected_label]
    flipped = scale_crop_flip(maps, scale=2.0, top=1, left=2, flip=True)
    assert flipped.label.tolist() == [row[::-1] for row in expected_label]


@pytest.mark.parametrize(("scale", "top", "left"), CASES)
def test_nearest_maps_pick_the_expected_source_pixel(scale: float, top: int, left: int) -> None:
    out = scale_crop_flip(encoded_maps(), scale=scale, top=top, left=left, flip=False)
    rows, cols = source_rows_cols(scale, top, left)
    expected = rows[:, None] * W + cols[None, :]
    assert out.label.dtype == torch.int64
    assert torch.equal(out.label, expected)
    # the depth is sampled at the same pixels and divided by the scale
    torch.testing.assert_close(out.depth[0], (1.0 + expected.float()) / scale, rtol=0, atol=0)


@pytest.mark.parametrize(("scale", "top", "left"), CASES)
def test_bilinear_maps_sample_the_aligned_coordinates(scale: float, top: int, left: int) -> None:
    out = scale_crop_flip(encoded_maps(), scale=scale, top=top, left=left, flip=False)
    rows, cols = bilinear_coordinates(scale, top, left)
    grid_y, grid_x = (t.float() for t in torch.meshgrid(rows, cols, indexing="ij"))
    torch.testing.assert_close(out.image[0], grid_y, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.image[1], grid_x, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.image[2], grid_y + 2 * grid_x, atol=1e-4, rtol=0)
    assert out.normal is not None
    torch.testing.assert_close(out.normal[0], 0.1 * grid_x, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.normal[1], -0.05 * grid_y, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.normal[2], torch.ones(H, W))  # not renormalised
    # image and label look at the same source pixel, up to the reference's sub-pixel offset
    near_rows, near_cols = source_rows_cols(scale, top, left)
    assert (rows - near_rows).abs().max() < 1
    assert (cols - near_cols).abs().max() < 1
    label_rows = torch.div(out.label, W, rounding_mode="floor")
    assert ((out.image[0] - label_rows).abs() < 1).all()
    assert ((out.image[1] - out.label % W).abs() < 1).all()


@pytest.mark.parametrize(("scale", "top", "left"), CASES)
def test_flip_mirrors_every_map_and_negates_normal_x(scale: float, top: int, left: int) -> None:
    maps = encoded_maps()
    plain = scale_crop_flip(maps, scale=scale, top=top, left=left, flip=False)
    flipped = scale_crop_flip(maps, scale=scale, top=top, left=left, flip=True)
    assert torch.equal(flipped.image, plain.image.flip(-1))
    assert torch.equal(flipped.label, plain.label.flip(-1))
    assert torch.equal(flipped.depth, plain.depth.flip(-1))
    assert flipped.normal is not None and plain.normal is not None
    assert torch.equal(flipped.normal[0], -plain.normal[0].flip(-1))
    assert torch.equal(flipped.normal[1:], plain.normal[1:].flip(-1))
    # pinned: the left edge now shows the right edge of the window
    rows, cols = source_rows_cols(scale, top, left)
    assert flipped.label[0, 0] == rows[0] * W + cols[-1]


def test_scale_one_without_flip_is_the_identity() -> None:
    maps = encoded_maps()
    out = scale_crop_flip(maps, scale=1.0, top=0, left=0, flip=False)
    for before, after in zip(maps, out, strict=True):
        assert before is not None and after is not None
        assert torch.equal(before, after)
        assert before.dtype == after.dtype


def test_inputs_are_not_modified() -> None:
    maps = encoded_maps()
    copies = [t.clone() for t in maps if t is not None]
    scale_crop_flip(maps, scale=1.5, top=2, left=3, flip=True)
    scale_crop_flip(maps, scale=1.0, top=0, left=0, flip=True)
    for before, after in zip(copies, [t for t in maps if t is not None], strict=True):
        assert torch.equal(before, after)


def test_without_normals_and_with_multiplied_inverse_depth() -> None:
    maps = encoded_maps(normals=False)
    out = scale_crop_flip(maps, scale=1.5, top=1, left=2, flip=True, depth_scaling="multiply")
    assert out.normal is None
    rows, cols = source_rows_cols(1.5, 1, 2)
    expected = (rows[:, None] * W + cols[None, :]).flip(-1)
    assert torch.equal(out.label, expected)
    torch.testing.assert_close(out.depth[0], (1.0 + expected.float()) * 1.5, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"scale": 0.5, "top": 0, "left": 0}, "`scale`"),
        ({"scale": math.nan, "top": 0, "left": 0}, "`scale`"),
        ({"scale": 1.5, "top": 5, "left": 0}, "`top` in [0, 4]"),
        ({"scale": 1.5, "top": 0, "left": -1}, "`left` in [0, 5]"),
        ({"scale": 100.0, "top": 0, "left": 0}, "empty window"),
    ],
)
def test_bad_parameters_are_value_errors(kwargs: dict[str, float], fragment: str) -> None:
    with pytest.raises(ValueError) as exc:
        scale_crop_flip(encoded_maps(), flip=False, **kwargs)  # type: ignore[arg-type]
    assert fragment in str(exc.value)


def test_mismatched_maps_are_value_errors() -> None:
    maps = encoded_maps()
    with pytest.raises(ValueError, match="`depth` of shape"):
        scale_crop_flip(maps._replace(depth=maps.depth[0]), scale=1.0, top=0, left=0, flip=False)
    with pytest.raises(ValueError, match="`normal` of shape"):
        scale_crop_flip(
            maps._replace(normal=torch.zeros(3, H, W + 1)), scale=1.0, top=0, left=0, flip=False
        )


# -- the random wrapper ---------------------------------------------------------------------


def test_draws_come_from_the_reference_choices() -> None:
    augment = RandomScaleCropFlip()
    assert augment.scales == REFERENCE_SCALES == (1.0, 1.2, 1.5)
    torch.manual_seed(0)
    draws = [augment.draw(288, 384) for _ in range(600)]
    assert {d.scale for d in draws} == {1.0, 1.2, 1.5}
    for d in draws:
        h, w = crop_size(288, 384, d.scale)
        assert 0 <= d.top <= 288 - h and 0 <= d.left <= 384 - w
    flips = sum(d.flip for d in draws)
    assert 240 < flips < 360
    tops = {d.top for d in draws if d.scale == 1.5}
    assert min(tops) < 20 and max(tops) > 76  # spread over [0, 96]


def test_draws_are_reproducible_under_a_torch_seed() -> None:
    augment = RandomScaleCropFlip()
    torch.manual_seed(7)
    first = [augment.draw(H, W) for _ in range(20)]
    torch.manual_seed(7)
    second = [augment.draw(H, W) for _ in range(20)]
    assert first == second
    assert all(isinstance(d, ScaleCropFlip) for d in first)
    torch.manual_seed(7)
    maps = encoded_maps()
    a = augment(maps)
    torch.manual_seed(7)
    b = augment(maps)
    for x, y in zip(a, b, strict=True):
        assert x is not None and y is not None
        assert torch.equal(x, y)
    torch.manual_seed(7)
    params = augment.draw(H, W)
    assert torch.equal(a.label, scale_crop_flip(maps, **params._asdict()).label)


def test_flip_probability_and_scale_options() -> None:
    torch.manual_seed(0)
    assert not any(RandomScaleCropFlip(flip_p=0.0).draw(H, W).flip for _ in range(50))
    assert all(RandomScaleCropFlip(flip_p=1.0).draw(H, W).flip for _ in range(50))
    assert {RandomScaleCropFlip(scales=(1.5,)).draw(H, W).scale for _ in range(20)} == {1.5}
    with pytest.raises(ValueError, match="`scales`"):
        RandomScaleCropFlip(scales=(0.8, 1.0))
    with pytest.raises(ValueError, match="`scales`"):
        RandomScaleCropFlip(scales=())
    with pytest.raises(ValueError, match="`flip_p`"):
        RandomScaleCropFlip(flip_p=1.5)


def test_augmented_batches_are_reproducible_in_a_worker(tmp_path: Path) -> None:
    root = dl.write_nyuv2(tmp_path / "nyu", train=4, val=1)
    train = nyuv2(root=str(root), augment=True).train
    steps = epoch_schedule({JOINT: 4}, batch_size=2, seed=0, epoch=0)

    def epoch(workers: int) -> list[torch.Tensor]:
        batches = iterate_batches({JOINT: train}, steps, num_workers=workers, seed=3)  # type: ignore[dict-item]
        return [b[JOINT]["targets"]["semantic"] for b in batches]

    first, second = epoch(1), epoch(1)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    torch.manual_seed(1)
    main_a = epoch(0)
    torch.manual_seed(1)
    main_b = epoch(0)
    for a, b in zip(main_a, main_b, strict=True):
        assert torch.equal(a, b)
