"""NYUv2 (13 classes, depth, surface normals) from the standard preprocessed copy.

The copy used by MTAN (Liu et al., CVPR 2019, https://arxiv.org/abs/1803.10704) and its
successors (CAGrad, Nash-MTL, FAMO): 795 training and 654 test images of 288 x 384 pixels, laid
out as ``ROOT/{train,val}/{image,label,depth,normal}/{i}.npy`` (see
:mod:`polytask.data.dense_folder`). polytask downloads nothing: get the copy linked from the
README of the MTAN repository (github.com/lorenmt/mtan) and point ``root`` at it.
"""

from __future__ import annotations

from typing import Literal

from ..errors import ConfigError
from .base import DATASETS, DataBundle
from .dense_folder import DenseLayout, Modality, dense_bundle
from .nyuv2_tasks import nyuv2_tasks

__all__ = ["NYUV2_LAYOUT", "SOURCE", "nyuv2"]

SOURCE = (
    "Get the preprocessed copies linked from the README of the MTAN repository "
    "(github.com/lorenmt/mtan); polytask downloads nothing."
)

NYUV2_LAYOUT = DenseLayout(
    name="NYUv2",
    modalities=(
        Modality("image", "image"),
        Modality("label", "label"),
        Modality("depth", "depth"),
        Modality("normal", "normal"),
    ),
    num_classes=13,
    source=SOURCE,
)

MetricProtocol = Literal["dataset", "per_batch"]


def check_protocol(value: object) -> MetricProtocol:
    if value == "dataset":
        return "dataset"
    if value == "per_batch":
        return "per_batch"
    raise ConfigError(
        f"Expected option `metric_protocol` to be 'dataset' or 'per_batch', found {value!r}."
    )


@DATASETS.register("nyuv2")
def nyuv2(
    *,
    root: str,
    augment: bool = False,
    val_size: int = 0,
    seed: int = 0,
    metric_protocol: MetricProtocol = "dataset",
    limit: int | None = None,
) -> DataBundle:
    """NYUv2 with the tasks ``semantic`` (13 classes, -1 = void), ``depth`` (metres, 0 =
    invalid) and ``normal`` (unit vectors, all-zero = invalid).

    Splits: ``test`` is the published ``val/`` folder (654 images). With ``val_size=0`` (the
    default) **the validation split is the test split**: the papers' protocol, which evaluates
    the test split every epoch and, with mean-of-last-epochs selection
    (``train.selection.protocol=mean_last``), chooses nothing on it; ``bundle.info["val_is_test"]``
    is then true. With ``val_size=N > 0``, N training images (a random subset seeded by
    ``seed``) are held out as the validation split, disjoint from train, for honest model
    selection.

    Every file is checked (name, format, dtype, shape) when the bundle is built; label and image
    values when a sample is loaded (training labels at build time).

    Args:
        root: the folder holding ``train/`` and ``val/``.
        augment: apply the reference's random scale, crop and flip to the train split
            (:class:`~polytask.data.augment.RandomScaleCropFlip`); off in the MTAN paper, on in
            CAGrad, Nash-MTL and FAMO.
        val_size: training images held out for validation; 0 validates on the test split.
        seed: seeds the hold-out, >= 0.
        metric_protocol: ``"dataset"`` computes depth and normal metrics over the whole split
            (exact); ``"per_batch"`` averages per-batch values, as the reference does.
        limit: use only the first ``limit`` images of each published split (quick runs).

    ``bundle.info`` holds the root, the split sizes, the image size, ``num_classes``,
    ``augment``, ``val_is_test`` and ``class_pixels``, the training pixels of every class.

    Raises:
        ConfigError: an option has the wrong type or is out of range.
        DataError: the folder does not follow the layout; the message names the file, what
            was expected, what was found and where to get the data.
    """
    tasks = nyuv2_tasks(NYUV2_LAYOUT.num_classes, check_protocol(metric_protocol))
    return dense_bundle(
        NYUV2_LAYOUT,
        tasks,
        root=root,
        augment=augment,
        val_size=val_size,
        seed=seed,
        limit=limit,
        info={"dataset": "nyuv2", "depth": "metres", "metric_protocol": metric_protocol},
    )
