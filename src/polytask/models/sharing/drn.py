"""Deep Relationship Networks (Long and Wang, "Learning Multiple Tasks with Deep
Relationship Networks", 2015, https://arxiv.org/abs/1506.02117; published as Long, Cao, Wang
and Yu, "Learning Multiple Tasks with Multilinear Relationship Networks", NIPS 2017).

Shared lower layers (the backbone, hard-shared as in ``hps``) and task-specific upper layers
(each task's head) whose weights, layer by layer, have a tensor-normal prior over outputs x
inputs x tasks; the three covariances are learned by alternating closed-form (flip-flop)
updates with the network's gradient steps. The prior, the updates and their deviations are
those of :class:`~polytask.models.regularizers.TensorNormal`.

``drn`` is built as hard sharing plus the ``tensor_normal`` regulariser on **every** weight
of every head (``model.head: mlp`` gives each task two such layers, as the paper's fc7 and
fc8; ``linear`` one). It is exactly ``model.architecture: hps`` with
``model.regularizers: [{name: tensor_normal, weight: W, layers: [0, 1, ...]}]``: the
architecture name only saves writing the layers out. That composition, rather than a
separate network class, is deliberate: the prior is what DRN adds to hard sharing, and the
same regulariser then applies to the heads of any other architecture (cross-stitch, MTAN,
...). The paper fine-tunes a pre-trained AlexNet with its lowest layers frozen; here the
backbone is whatever ``model.backbone`` builds, trained from scratch.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...errors import ConfigError
from ...options import Limit
from ...tasks import Task
from ..base import ARCHITECTURES, BackboneFactory, HeadFactory, MultiTaskModel
from ..regularizers import RegularizerSpec, attach_regularizers
from .hard import HardSharing

__all__ = ["deep_relationship_network"]


@ARCHITECTURES.register("drn", limits={"weight": Limit(ge=0), "eps": Limit(gt=0)})
def deep_relationship_network(
    *,
    tasks: Mapping[str, Task],
    backbone: BackboneFactory,
    head: HeadFactory,
    weight: float = 1e-5,
    eps: float = 1e-3,
    feature_covariances: bool = True,
) -> MultiTaskModel:
    """Hard sharing with a tensor-normal prior on every head weight (see module docs).

    Args:
        tasks: the tasks, by name (at least two).
        backbone: builds the shared lower layers.
        head: builds a task's upper layers; every task's head must have the same shapes.
        weight: the prior's weight (``lambda``; >= 0). Small: at the covariances' optimum
            the quadratic form is about ``D1 D2 K`` per layer (thousands), and its gradient
            ``2 Sigma^{-1} W`` grows as the weights shrink; on one batch of MultiDigits,
            1e-3 kept the training loss at 1.2 after 60 epochs, 1e-5 let it fall to 0.002.
        eps: the ridge of the covariance updates (> 0).
        feature_covariances: learn the output and input covariances too (the paper).
    """
    if len(tasks) < 2:
        raise ConfigError(
            f"architecture drn relates several tasks; found {len(tasks)} task "
            f"({', '.join(tasks)}). Use single_task or hps for one task."
        )
    model = HardSharing(tasks=tasks, backbone=backbone, head=head)
    first = model.task_names[0]
    count = sum(1 for p in model.task_parameters(first) if p.dim() >= 2)
    spec = RegularizerSpec(
        name="tensor_normal",
        weight=weight,
        options={"eps": eps, "feature_covariances": feature_covariances},
        layers=tuple(range(count)),
    )
    return attach_regularizers(model, [spec], where="model.options")
