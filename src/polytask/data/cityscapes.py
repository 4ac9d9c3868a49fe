"""CityScapes (7 or 19 classes, inverse depth) from the standard preprocessed copy.

The copy used by MTAN (Liu et al., CVPR 2019, https://arxiv.org/abs/1803.10704) and its
successors: 2975 training and 500 test images (the official validation set) of 128 x 256
pixels, laid out as ``ROOT/{train,val}/{image,label_7,label_19,depth}/{i}.npy`` (see
:mod:`polytask.data.dense_folder`); ``depth`` holds inverse depth (disparity), 0 = invalid.
polytask downloads nothing: get the copy linked from the README of the MTAN repository
(github.com/lorenmt/mtan) and point ``root`` at it.
"""

from __future__ import annotations

from ..errors import ConfigError
from .augment import DepthScaling
from .base import DATASETS, DataBundle
from .dense_folder import DenseLayout, Modality, dense_bundle
from .nyuv2 import SOURCE, MetricProtocol, check_protocol
from .nyuv2_tasks import nyuv2_tasks

__all__ = ["CITYSCAPES_CLASSES", "cityscapes", "cityscapes_layout"]

CITYSCAPES_CLASSES = (7, 19)
"""The label sets of the preprocessed copy: folders ``label_7`` and ``label_19``."""


def cityscapes_layout(num_classes: int) -> DenseLayout:
    """The layout with the label folder ``label_{num_classes}``."""
    return DenseLayout(
        name=f"CityScapes ({num_classes} classes)",
        modalities=(
            Modality("image", "image"),
            Modality(f"label_{num_classes}", "label"),
            Modality("depth", "depth"),
        ),
        num_classes=num_classes,
        source=SOURCE,
    )


@DATASETS.register("cityscapes")
def cityscapes(
    *,
    root: str,
    num_classes: int = 7,
    augment: bool = False,
    val_size: int = 0,
    seed: int = 0,
    metric_protocol: MetricProtocol = "dataset",
    limit: int | None = None,
    depth_scaling: DepthScaling = "divide",
) -> DataBundle:
    """CityScapes with the tasks ``semantic`` (7 or 19 classes, -1 = void) and ``depth``
    (inverse depth, 0 = invalid), the same losses and metrics as NYUv2.

    Splits: ``test`` is the published ``val/`` folder (500 images, the papers' test split).
    With ``val_size=0`` (the default) **the validation split is the test split**, the papers'
    protocol (``bundle.info["val_is_test"]`` is true); ``val_size=N > 0`` holds out N training
    images (seeded by ``seed``) as validation, disjoint from train.

    Args:
        root: the folder holding ``train/`` and ``val/``.
        num_classes: 7 reads ``label_7``, 19 reads ``label_19``.
        augment: the reference's random scale, crop and flip on the train split.
        val_size, seed, metric_protocol, limit: as for :func:`polytask.data.nyuv2.nyuv2`.
        depth_scaling: how the augmentation rescales the inverse depth at zoom ``s``:
            ``"divide"`` by ``s`` (the reference, as for metric depth) or ``"multiply"``
            (geometrically right for inverse depth).

    Raises:
        ConfigError: an option has the wrong type or is out of range.
        DataError: the folder does not follow the layout; the message names the file.
    """
    if isinstance(num_classes, bool) or num_classes not in CITYSCAPES_CLASSES:
        raise ConfigError(
            f"Expected option `num_classes` to be 7 or 19 (folders label_7 / label_19), "
            f"found {num_classes!r}."
        )
    if depth_scaling not in ("divide", "multiply"):
        raise ConfigError(
            "Expected option `depth_scaling` to be 'divide' or 'multiply', "
            f"found {depth_scaling!r}."
        )
    every = nyuv2_tasks(num_classes, check_protocol(metric_protocol))
    tasks = {name: every[name] for name in ("semantic", "depth")}
    return dense_bundle(
        cityscapes_layout(num_classes),
        tasks,
        root=root,
        augment=augment,
        val_size=val_size,
        seed=seed,
        limit=limit,
        depth_scaling=depth_scaling,
        info={
            "dataset": "cityscapes",
            "depth": "inverse depth (disparity)",
            "label_folder": f"label_{num_classes}",
            "metric_protocol": metric_protocol,
            "depth_scaling": depth_scaling,
        },
    )
