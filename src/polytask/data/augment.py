"""The joint augmentation of dense-prediction samples used by the NYUv2 / CityScapes benchmarks.

The reference (the MTAN code's ``RandomScaleCrop``, kept by CAGrad, Nash-MTL and FAMO; off in
the MTAN paper itself) transforms the image and every target map of a sample together:

1. draw a scale ``s`` from ``{1.0, 1.2, 1.5}``;
2. crop an ``int(H / s) x int(W / s)`` window whose top-left corner is uniform over the valid
   positions, and resize it back to ``H x W``: the image and the normals bilinearly with
   ``align_corners=True``, the label and the depth by nearest neighbour (PyTorch's
   ``"nearest"``: output pixel ``y`` takes source row ``top + floor(y * h / H)``);
3. divide the depth by ``s`` (zooming in by ``s`` brings the scene ``s`` times closer);
4. with probability 0.5 flip every map horizontally and negate the x component (channel 0)
   of the normals.

The normals are not renormalised after interpolation, as in the reference. Bilinear
sampling with ``align_corners=True`` maps output pixel ``y`` to the source coordinate
``top + y * (h - 1) / (H - 1)``, nearest sampling to ``top + floor(y * h / H)``: the two differ
by less than one source pixel, a small misalignment the reference has and polytask keeps.

CityScapes stores inverse depth (disparity), which *grows* by ``s`` when the scene comes
``s`` times closer; the reference divides it by ``s`` all the same, and so does polytask by
default. ``depth_scaling="multiply"`` is the geometrically consistent alternative.

:func:`scale_crop_flip` is the deterministic transform; :class:`RandomScaleCropFlip` draws its
parameters from PyTorch's global random generator, which the trainer seeds (and checkpoints)
in the main process and PyTorch seeds in every DataLoader worker, so both are reproducible.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "REFERENCE_SCALES",
    "DenseMaps",
    "DepthScaling",
    "RandomScaleCropFlip",
    "ScaleCropFlip",
    "crop_size",
    "scale_crop_flip",
]

REFERENCE_SCALES = (1.0, 1.2, 1.5)
"""The scales the reference draws from."""

DepthScaling = Literal["divide", "multiply"]


class DenseMaps(NamedTuple):
    """One sample's image and target maps, channels first.

    Attributes:
        image: ``[C, H, W]`` floats.
        label: ``[H, W]`` class indices (any dtype; -1 = void survives nearest sampling).
        depth: ``[1, H, W]`` depth or inverse depth, 0 = invalid.
        normal: ``[3, H, W]`` surface normals (x, y, z), or ``None`` (CityScapes).
    """

    image: Tensor
    label: Tensor
    depth: Tensor
    normal: Tensor | None = None


class ScaleCropFlip(NamedTuple):
    """The parameters of one draw of the augmentation."""

    scale: float
    top: int
    left: int
    flip: bool


def crop_size(height: int, width: int, scale: float) -> tuple[int, int]:
    """The ``(int(height / scale), int(width / scale))`` window cropped at ``scale``."""
    return int(height / scale), int(width / scale)


def _check_maps(maps: DenseMaps) -> tuple[int, int]:
    image, label, depth, normal = maps
    if image.dim() != 3:
        raise ValueError(f"Expected `image` of shape [C, H, W], found {tuple(image.shape)}.")
    size = tuple(image.shape[-2:])
    expected = {"label": (label, size), "depth": (depth, (1, *size))}
    if normal is not None:
        expected["normal"] = (normal, (3, *size))
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"Expected `{name}` of shape {list(shape)} (the image is {list(image.shape)}), "
                f"found {list(tensor.shape)}."
            )
    return int(size[0]), int(size[1])


def _resize(window: Tensor, size: tuple[int, int], *, bilinear: bool) -> Tensor:
    """``window`` ``[C, h, w]`` resized to ``[C, *size]``."""
    if bilinear:
        out = F.interpolate(window[None], size=size, mode="bilinear", align_corners=True)
    else:
        out = F.interpolate(window[None], size=size, mode="nearest")
    return out[0]


def scale_crop_flip(
    maps: DenseMaps,
    *,
    scale: float,
    top: int,
    left: int,
    flip: bool,
    depth_scaling: DepthScaling = "divide",
) -> DenseMaps:
    """Crop the ``crop_size(H, W, scale)`` window at ``(top, left)``, resize it back, flip.

    See the module docstring for the exact sampling. ``scale=1`` without ``flip`` returns the
    maps unchanged. The inputs are not modified.

    Args:
        maps: the sample, channels first (see :class:`DenseMaps`).
        scale: the zoom factor ``s >= 1``.
        top, left: the window's top-left corner, in ``[0, H - h]`` and ``[0, W - w]``.
        flip: mirror every map horizontally and negate the x component of the normals.
        depth_scaling: ``"divide"`` the depth by ``s`` (the reference, for depth and for
            CityScapes' inverse depth alike) or ``"multiply"`` it (right for inverse depth).

    Raises:
        ValueError: the maps' shapes disagree, or the parameters are out of range.
    """
    height, width = _check_maps(maps)
    if not (math.isfinite(scale) and scale >= 1.0):
        raise ValueError(f"Expected `scale` to be a number >= 1, found {scale!r}.")
    if depth_scaling not in ("divide", "multiply"):
        raise ValueError(
            f"Expected `depth_scaling` to be 'divide' or 'multiply', found {depth_scaling!r}."
        )
    h, w = crop_size(height, width, scale)
    if h < 1 or w < 1:
        raise ValueError(
            f"`scale`={scale} leaves an empty window of {h} x {w} in a {height} x {width} image."
        )
    if not (0 <= top <= height - h and 0 <= left <= width - w):
        raise ValueError(
            f"Expected `top` in [0, {height - h}] and `left` in [0, {width - w}] for a "
            f"{h} x {w} window in a {height} x {width} image, found top={top}, left={left}."
        )
    image, label, depth, normal = maps
    if (h, w) != (height, width):
        rows, cols = slice(top, top + h), slice(left, left + w)
        size = (height, width)
        image = _resize(image[:, rows, cols], size, bilinear=True)
        # Nearest sampling of the label in float32 (exact for class indices) picks the same
        # source pixels as the depth's.
        label = _resize(label[None, rows, cols].to(torch.float32), size, bilinear=False)[0]
        label = label.to(maps.label.dtype)
        depth = _resize(depth[:, rows, cols], size, bilinear=False)
        if normal is not None:
            normal = _resize(normal[:, rows, cols], size, bilinear=True)
    if scale != 1.0:
        depth = depth / scale if depth_scaling == "divide" else depth * scale
    if flip:
        image = image.flip(-1)
        label = label.flip(-1)
        depth = depth.flip(-1)
        if normal is not None:
            sign = torch.tensor([-1.0, 1.0, 1.0], dtype=normal.dtype, device=normal.device)
            normal = normal.flip(-1) * sign[:, None, None]
    return DenseMaps(image, label, depth, normal)


class RandomScaleCropFlip:
    """:func:`scale_crop_flip` with parameters drawn from PyTorch's global random generator.

    Per call: the scale uniformly from ``scales``, then ``top`` and ``left`` uniformly over the
    valid positions, then a flip with probability ``flip_p`` (four draws, in this order).

    Args:
        scales: the zoom factors to choose from, each >= 1 (the reference: 1.0, 1.2, 1.5).
        flip_p: the probability of a horizontal flip, in [0, 1].
        depth_scaling: see :func:`scale_crop_flip`.

    Example:
        >>> import torch
        >>> maps = DenseMaps(torch.rand(3, 8, 12), torch.zeros(8, 12), torch.ones(1, 8, 12))
        >>> _ = torch.manual_seed(0)
        >>> out = RandomScaleCropFlip()(maps)
        >>> out.image.shape, out.normal is None
        (torch.Size([3, 8, 12]), True)
    """

    def __init__(
        self,
        scales: Sequence[float] = REFERENCE_SCALES,
        flip_p: float = 0.5,
        depth_scaling: DepthScaling = "divide",
    ) -> None:
        scales = tuple(float(s) for s in scales)
        if not scales or not all(math.isfinite(s) and s >= 1.0 for s in scales):
            raise ValueError(f"Expected `scales` to be numbers >= 1, found {list(scales)}.")
        if not 0.0 <= flip_p <= 1.0:
            raise ValueError(f"Expected `flip_p` in [0, 1], found {flip_p!r}.")
        if depth_scaling not in ("divide", "multiply"):
            raise ValueError(
                f"Expected `depth_scaling` to be 'divide' or 'multiply', found {depth_scaling!r}."
            )
        self.scales = scales
        self.flip_p = float(flip_p)
        self.depth_scaling: DepthScaling = depth_scaling

    def draw(self, height: int, width: int) -> ScaleCropFlip:
        """Draw the parameters for an ``height x width`` sample."""
        scale = self.scales[int(torch.randint(len(self.scales), ()).item())]
        h, w = crop_size(height, width, scale)
        top = int(torch.randint(height - h + 1, ()).item())
        left = int(torch.randint(width - w + 1, ()).item())
        flip = bool(torch.rand(()).item() < self.flip_p)
        return ScaleCropFlip(scale, top, left, flip)

    def __call__(self, maps: DenseMaps) -> DenseMaps:
        height, width = maps.image.shape[-2:]
        params = self.draw(int(height), int(width))
        return scale_crop_flip(maps, **params._asdict(), depth_scaling=self.depth_scaling)

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(scales={self.scales}, flip_p={self.flip_p}, "
            f"depth_scaling={self.depth_scaling!r})"
        )
