"""Metrics accumulated exactly over a whole split, and Delta_m against single-task baselines.

Every metric is a :class:`Metric` (``update`` -> ``compute`` -> ``reset``, mergeable across
processes) that declares ``higher_is_better`` for each value it returns. Ratios are reported
in percent, as in the papers' tables; errors in their natural unit. The built-in metrics are
registered in :data:`METRICS`:

* ``"segmentation"``: :class:`SegmentationMetric` (``miou``, ``pixel_acc``)
* ``"depth"``: :class:`DepthMetric` (``abs_err``, ``rel_err``)
* ``"normals"``: :class:`NormalMetric` (``mean``, ``median``, ``within_11.25``,
  ``within_22.5``, ``within_30``)
* ``"accuracy"``: :class:`Accuracy` (``accuracy``)
* ``"regression"``: :class:`RegressionMetric` (``mae``, ``rmse``)
* ``"multilabel"``: :class:`MultiLabelMetric` (binary and multi-label: ``f1``, ``precision``,
  ``recall``, ``balanced_accuracy``, ``roc_auc``, ``average_precision`` averaged over labels,
  ``f1_micro``, ``precision_micro``, ``recall_micro``, ``hamming_loss``, ``subset_accuracy``;
  ``values`` selects which)

Delta_m, in either of its two named conventions, is :func:`delta_m` against a
:class:`Baseline`; the decathlon score of Rebuffi et al. (many classification tasks at once)
is :func:`decathlon_score` against the same baseline.
"""

from .base import Metric, Reduction, select_labelled
from .classification import Accuracy
from .decathlon import decathlon_score
from .delta_m import DELTA_M_CONVENTIONS, Baseline, delta_m, delta_m_higher_is_better
from .depth import PROTOCOLS, DepthMetric, MetricProtocol
from .multilabel import MULTILABEL_VALUES, MultiLabelMetric
from .normals import THRESHOLDS, NormalMetric
from .registry import METRICS
from .regression import RegressionMetric
from .segmentation import SegmentationMetric

__all__ = [
    "DELTA_M_CONVENTIONS",
    "METRICS",
    "MULTILABEL_VALUES",
    "PROTOCOLS",
    "THRESHOLDS",
    "Accuracy",
    "Baseline",
    "DepthMetric",
    "Metric",
    "MetricProtocol",
    "MultiLabelMetric",
    "NormalMetric",
    "Reduction",
    "RegressionMetric",
    "SegmentationMetric",
    "decathlon_score",
    "delta_m",
    "delta_m_higher_is_better",
    "select_labelled",
]
