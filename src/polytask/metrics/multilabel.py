"""Binary and multi-label classification: F1, precision, recall, balanced accuracy, ROC-AUC, AP."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from ..errors import ConfigError
from .base import Metric
from .registry import METRICS

__all__ = ["MULTILABEL_VALUES", "MultiLabelMetric"]

MULTILABEL_VALUES: tuple[str, ...] = (
    "f1",
    "precision",
    "recall",
    "balanced_accuracy",
    "roc_auc",
    "average_precision",
    "f1_micro",
    "precision_micro",
    "recall_micro",
    "hamming_loss",
    "subset_accuracy",
)
"""Every value :class:`MultiLabelMetric` can return, in its order of documentation."""

_RANKED = ("roc_auc", "average_precision")
_COUNTS = ("tp", "fp", "fn")


@METRICS.register("multilabel")
class MultiLabelMetric(Metric):
    r"""Binary and multi-label classification with imbalanced labels, all values in percent.

    ``pred`` is logits ``[B, L]`` (or ``[B]``: one label, ``L = 1``); label ``l`` of sample
    ``i`` is predicted positive iff ``pred[i, l] > threshold`` (``threshold=0``: probability
    0.5). ``target`` has the same shape and holds 0 or 1 (float, integer or bool). ``L`` is
    fixed by the first batch added (after a :meth:`reset`, by the next one); a batch with
    another number of labels is refused.

    From the counts ``TP_l, FP_l, FN_l, TN_l`` of each label ``l`` over ``N`` samples:

    * ``f1``, ``precision``, ``recall``: per label ``2 TP / (2 TP + FP + FN)``,
      ``TP / (TP + FP)``, ``TP / (TP + FN)``, then the unweighted mean over the ``L``
      labels (macro). A ratio ``0 / 0`` is 0 and counts as 0 in the mean, as scikit-learn's
      default ``zero_division=0``: a label never predicted positive has precision 0.
    * ``balanced_accuracy``: per label the mean of the true positive rate and the true
      negative rate over the classes present in that label's targets (only the TPR if every
      target is 1, only the TNR if every target is 0), as ``balanced_accuracy_score`` on the
      label's column; then the macro mean.
    * ``f1_micro``, ``precision_micro``, ``recall_micro``: the same ratios of the counts
      summed over all labels (``0 / 0`` is 0).
    * ``hamming_loss``: ``100 * sum_l (FP_l + FN_l) / (N L)``; lower is better.
    * ``subset_accuracy``: ``100 *`` the share of samples with every label right.

    The two ranking values are exact (no binning of the scores) and need every score of the
    split, so they are kept (as ``"cat"`` states) only when one of them is selected:

    * ``roc_auc``: per label the Mann-Whitney statistic
      ``(sum of the ranks of the positives - P (P + 1) / 2) / (P Q)`` over the ``P`` positive
      and ``Q`` negative samples, tied scores sharing their average rank; equal to
      scikit-learn's ``roc_auc_score``, ties included.
    * ``average_precision``: per label ``sum_n (R_n - R_{n-1}) P_n`` over the distinct scores
      in descending order (tied scores form one threshold), ``R_n`` and ``P_n`` the recall
      and precision of predicting positive the samples scoring at least the ``n``-th; equal
      to scikit-learn's ``average_precision_score``.

    Both are undefined for a label whose targets are all of one class: such a label is left
    out of the macro mean (NaN if no label is defined) and is ``None`` in :meth:`details`.
    scikit-learn 1.9 differs there: ``roc_auc_score`` gives NaN for that label (so a macro
    average over the columns is NaN as a whole) and ``average_precision_score`` gives 0 for a
    label without positives and 1 for a label without negatives, counted in its macro mean.

    Args:
        values: the values :meth:`compute` returns (and Delta_m and model selection see), in
            this order; any of :data:`MULTILABEL_VALUES`, without repeats.
        threshold: the logit above which a label is predicted positive.

    Every value but ``hamming_loss`` is higher-is-better; each is NaN when nothing was added.
    """

    def __init__(self, values: Sequence[str] = ("f1", "roc_auc"), threshold: float = 0.0) -> None:
        super().__init__()
        self.values = _check_values(values)
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, int | float)
            or not math.isfinite(threshold)
        ):
            raise ConfigError(
                f"Expected argument `threshold` to be a finite number but got {threshold!r}."
            )
        self.threshold = float(threshold)
        self.ranked = any(v in _RANKED for v in self.values)
        self.higher_is_better = {v: v != "hamming_loss" for v in self.values}
        # Per-label counts start empty: their length, the number of labels, comes with the
        # first batch (see `_fix_labels`).
        for name in _COUNTS:
            self.add_state(name, torch.zeros(0, dtype=torch.int64), "sum")
        self.add_state("samples", torch.zeros((), dtype=torch.int64), "sum")
        self.add_state("exact", torch.zeros((), dtype=torch.int64), "sum")
        if self.ranked:
            # [B, L] flattened row by row, so that concatenated pieces are [N * L] row by row.
            self.add_state("scores", torch.zeros(0, dtype=torch.float64), "cat")
            self.add_state("targets", torch.zeros(0, dtype=torch.int64), "cat")

    # -- the number of labels ---------------------------------------------------------
    @property
    def num_labels(self) -> int | None:
        """``L``, or None while nothing was added."""
        length = self.sum_state("tp").numel()
        return length if length else None

    def _fix_labels(self, num_labels: int, source: str) -> None:
        """Set ``L`` if it is not known yet, else check that ``num_labels`` is ``L``."""
        known = self.num_labels
        if known is None:
            for name in _COUNTS:
                self._state[name] = torch.zeros(num_labels, dtype=torch.int64)
        elif known != num_labels:
            raise ValueError(
                f"Expected {known} labels, as in the batches added before, but {source} has "
                f"{num_labels}."
            )

    # -- state ------------------------------------------------------------------------
    def merge(self, other: Metric) -> None:
        if isinstance(other, MultiLabelMetric) and type(other) is type(self):
            if other.threshold != self.threshold:
                raise TypeError(
                    f"cannot merge a MultiLabelMetric with threshold {other.threshold} into one "
                    f"with threshold {self.threshold}"
                )
            theirs = other.num_labels
            if theirs is None:
                if other._defaults.keys() == self._defaults.keys():
                    return  # nothing was added there
            else:
                self._fix_labels(theirs, "the merged metric")
        super().merge(other)

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        lengths = {state[name].numel() for name in _COUNTS}
        if len(lengths) != 1:
            raise ValueError(f"Expected the per-label counts {_COUNTS} to have one length.")
        num_labels = lengths.pop()
        if (num_labels == 0) != (int(state["samples"]) == 0):
            raise ValueError("Expected per-label counts exactly when samples were added.")
        if self.ranked:
            expected = int(state["samples"]) * num_labels
            for name in ("scores", "targets"):
                if state[name].numel() != expected:
                    raise ValueError(
                        f"Expected `{name}` to hold {expected} entries (samples x labels), "
                        f"found {state[name].numel()}."
                    )
        super().load_state_dict(state)

    def sync(self, group: object | None = None) -> None:
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()):
            return
        # A process that saw no sample does not know L yet: agree on it before summing.
        sizes: list[int | None] = [None] * dist.get_world_size(group)  # type: ignore[arg-type]
        dist.all_gather_object(sizes, self.num_labels or 0, group=group)  # type: ignore[arg-type]
        known = {size for size in sizes if size}
        if len(known) > 1:
            raise ValueError(f"Expected one number of labels in every process, found {known}.")
        if known:
            self._fix_labels(known.pop(), "another process")
        super().sync(group)

    # -- update -----------------------------------------------------------------------
    def _update(self, pred: Tensor, target: Tensor) -> None:
        if not pred.is_floating_point():
            raise ValueError(
                f"Expected `pred` to hold logits (a floating-point tensor), found dtype "
                f"{pred.dtype}."
            )
        if pred.shape != target.shape:
            raise ValueError(
                f"Expected `pred` and `target` of the same shape, found pred "
                f"{tuple(pred.shape)} and target {tuple(target.shape)}."
            )
        if pred.dim() not in (1, 2) or (pred.dim() == 2 and pred.shape[1] == 0):
            raise ValueError(
                f"Expected `pred` and `target` of shape [B] (one label) or [B, L] with L >= 1, "
                f"found {tuple(pred.shape)}."
            )
        if target.is_complex():
            raise ValueError(f"Expected `target` to hold 0 or 1, found dtype {target.dtype}.")
        if pred.dim() == 1:
            pred, target = pred[:, None], target[:, None]
        valid = (target == 0) | (target == 1)
        if not bool(valid.all()):
            raise ValueError(
                f"Expected `target` to hold 0 or 1, found {target[~valid][0].item()!r}."
            )
        scores = pred.to(torch.float64)
        if bool(scores.isnan().any()):
            raise ValueError("Expected `pred` without NaN, found NaN in a labelled sample.")
        self._fix_labels(scores.shape[1], "this batch")

        positive = target.to(torch.bool)
        predicted = scores > self.threshold
        self.accumulate("tp", (predicted & positive).sum(0))
        self.accumulate("fp", (predicted & ~positive).sum(0))
        self.accumulate("fn", (~predicted & positive).sum(0))
        self.accumulate("samples", torch.tensor(scores.shape[0]))
        self.accumulate("exact", (predicted == positive).all(1).sum())
        if self.ranked:
            self.accumulate("scores", scores)
            self.accumulate("targets", positive)

    # -- values -----------------------------------------------------------------------
    def _per_label(self, ranked: bool) -> dict[str, list[float | None]]:
        """The per-label values in percent (and the counts), as :meth:`details` gives them."""
        samples = int(self.sum_state("samples"))
        tp, fp, fn = (self.sum_state(name).tolist() for name in _COUNTS)
        out: dict[str, list[float | None]] = {
            "f1": [],
            "precision": [],
            "recall": [],
            "balanced_accuracy": [],
        }
        for t, f_p, f_n in zip(tp, fp, fn, strict=True):
            pos, neg = t + f_n, samples - t - f_n
            tn = neg - f_p
            out["f1"].append(_ratio(2 * t, 2 * t + f_p + f_n))
            out["precision"].append(_ratio(t, t + f_p))
            out["recall"].append(_ratio(t, pos))
            if pos and neg:  # (TP / pos + TN / neg) / 2 with one rounding
                out["balanced_accuracy"].append(100 * (t * neg + tn * pos) / (2 * pos * neg))
            else:
                out["balanced_accuracy"].append(_ratio(t, pos) if pos else _ratio(tn, neg))
        if ranked:
            auc, ap = self._ranked_per_label()
            out["roc_auc"], out["average_precision"] = auc, ap
        out["positives"] = [float(t + f_n) for t, f_n in zip(tp, fn, strict=True)]
        out["samples"] = [float(samples)] * len(tp)
        return out

    def _ranked_per_label(self) -> tuple[list[float | None], list[float | None]]:
        """Exact ROC-AUC and average precision of every label, None where undefined."""
        num_labels = self.num_labels
        assert num_labels is not None
        scores = self.cat_state("scores").reshape(-1, num_labels)
        targets = self.cat_state("targets").reshape(-1, num_labels).to(torch.bool)
        auc: list[float | None] = []
        ap: list[float | None] = []
        for label in range(num_labels):
            y = targets[:, label]
            pos = int(y.sum())
            neg = y.numel() - pos
            if pos == 0 or neg == 0:
                auc.append(None)
                ap.append(None)
                continue
            # Distinct scores, ascending, with the group of every sample and the group sizes.
            _, group, sizes = torch.unique(
                scores[:, label], sorted=True, return_inverse=True, return_counts=True
            )
            # Mann-Whitney: a group spanning 1-based ranks start+1 .. start+size has the average
            # rank start + (size + 1) / 2; twice that is an integer, so the sum is exact.
            starts = sizes.cumsum(0) - sizes
            twice_rank = 2 * starts + sizes + 1
            twice_rank_sum = int(twice_rank[group][y].sum())
            auc.append(100 * (twice_rank_sum - pos * (pos + 1)) / (2 * pos * neg))
            # Average precision over the distinct scores in descending order: each group adds
            # its positives / P (the recall step) times the precision at its threshold.
            group_pos = torch.zeros_like(sizes).index_add_(0, group, y.to(torch.int64)).flip(0)
            seen_pos = group_pos.cumsum(0).to(torch.float64)
            seen = sizes.flip(0).cumsum(0).to(torch.float64)
            ap.append(100 * float((group_pos.to(torch.float64) * seen_pos / seen).sum()) / pos)
        return auc, ap

    def details(self) -> dict[str, list[float | None]]:
        """Per label, in label order: ``f1``, ``precision``, ``recall``, ``balanced_accuracy``
        (percent, ``0 / 0`` as 0 as in the macro means, which are their plain averages), with
        ``roc_auc`` and ``average_precision`` when the scores are kept (None for a label whose
        targets are one class), ``positives`` (positive targets) and ``samples``. Nothing
        while nothing was added."""
        if self.num_labels is None:
            return {}
        return self._per_label(self.ranked)

    def compute(self) -> dict[str, float]:
        if self.num_labels is None:
            return {v: float("nan") for v in self.values}
        per_label = self._per_label(any(v in _RANKED for v in self.values))
        tp, fp, fn = (int(self.sum_state(name).sum()) for name in _COUNTS)
        samples, exact = int(self.sum_state("samples")), int(self.sum_state("exact"))
        entries = samples * len(per_label["f1"])
        pooled = {
            "f1_micro": _ratio(2 * tp, 2 * tp + fp + fn),
            "precision_micro": _ratio(tp, tp + fp),
            "recall_micro": _ratio(tp, tp + fn),
            "hamming_loss": 100 * (fp + fn) / entries,
            "subset_accuracy": 100 * exact / samples,
        }
        out: dict[str, float] = {}
        for name in self.values:
            if name in pooled:
                out[name] = pooled[name]
            else:
                defined = [v for v in per_label[name] if v is not None]
                out[name] = sum(defined) / len(defined) if defined else float("nan")
        return out


def _ratio(numerator: int, denominator: int) -> float:
    """``100 * numerator / denominator`` in one rounding; 0 for ``0 / 0``."""
    return 100 * numerator / denominator if denominator else 0.0


def _check_values(values: object) -> tuple[str, ...]:
    known = ", ".join(repr(v) for v in MULTILABEL_VALUES)
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ConfigError(
            f"Expected argument `values` to be a list of value names (of {known}) but got "
            f"{values!r}."
        )
    chosen = tuple(values)
    if not chosen:
        raise ConfigError(f"Expected argument `values` to name at least one of {known}.")
    unknown = [v for v in chosen if v not in MULTILABEL_VALUES]
    if unknown:
        raise ConfigError(
            f"Unknown value {unknown[0]!r} in argument `values`; the known values are {known}."
        )
    repeated = sorted({v for v in chosen if chosen.count(v) > 1})
    if repeated:
        raise ConfigError(f"Expected argument `values` without repeats, found {repeated} twice.")
    return chosen
