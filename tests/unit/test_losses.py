"""Losses against naive formulas, with per-sample label masks and invalid pixels."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polytask.losses import (
    BCEWithLogitsLoss,
    CrossEntropyLoss,
    DepthL1Loss,
    L1Loss,
    MSELoss,
    NormalCosineLoss,
)


def _gen() -> torch.Generator:
    return torch.Generator().manual_seed(0)


def test_cross_entropy_matches_torch_on_labelled_samples_and_ignores_void() -> None:
    g = _gen()
    logits = torch.randn(6, 5, 4, 4, generator=g)
    target = torch.randint(-1, 5, (6, 4, 4), generator=g)
    mask = torch.tensor([True, False, True, True, False, True])
    got = CrossEntropyLoss(ignore_index=-1)(logits, target, mask)
    expected = F.cross_entropy(logits[mask], target[mask], ignore_index=-1)
    torch.testing.assert_close(got, expected)
    # without a mask it is torch's mean over non-void pixels
    torch.testing.assert_close(
        CrossEntropyLoss()(logits, target), F.cross_entropy(logits, target, ignore_index=-1)
    )


def test_a_batch_without_labels_contributes_exactly_nothing() -> None:
    logits = torch.randn(4, 3, requires_grad=True)
    target = torch.tensor([0, 1, 2, 0])
    none = torch.zeros(4, dtype=torch.bool)
    for loss_fn in (CrossEntropyLoss(), MSELoss(), L1Loss()):
        pred = logits if isinstance(loss_fn, CrossEntropyLoss) else logits[:, :1]
        tgt = target if isinstance(loss_fn, CrossEntropyLoss) else target[:, None].float()
        loss = loss_fn(pred, tgt, none)
        assert loss.item() == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.count_nonzero(grad) == 0


def test_depth_l1_over_valid_pixels_is_the_reference_formula() -> None:
    g = _gen()
    pred = torch.rand(3, 1, 5, 5, generator=g)
    target = torch.rand(3, 1, 5, 5, generator=g)
    target[target < 0.3] = 0  # invalid pixels
    mask = torch.tensor([True, True, False])
    got = DepthL1Loss()(pred, target, mask)
    sel_p, sel_t = pred[:2], target[:2]
    valid = sel_t != 0
    expected = (sel_p[valid] - sel_t[valid]).abs().sum() / valid.sum()
    torch.testing.assert_close(got, expected)


def test_normal_cosine_loss_is_one_minus_mean_cosine_over_valid_pixels() -> None:
    g = _gen()
    pred = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    target = F.normalize(torch.randn(2, 3, 4, 4, generator=g), dim=1)
    target[0, :, :2, :] = 0  # invalid pixels: all channels zero
    got = NormalCosineLoss()(pred, target)
    valid = target.sum(dim=1) != 0
    cos = (pred * target).sum(dim=1)[valid]
    torch.testing.assert_close(got, 1 - cos.mean())


def test_elementwise_losses_with_mask() -> None:
    g = _gen()
    pred = torch.randn(5, 2, generator=g)
    target = torch.randn(5, 2, generator=g)
    mask = torch.tensor([True, False, True, False, False])
    torch.testing.assert_close(MSELoss()(pred, target, mask), F.mse_loss(pred[mask], target[mask]))
    torch.testing.assert_close(L1Loss()(pred, target, mask), F.l1_loss(pred[mask], target[mask]))
    binary = (target > 0).float()
    torch.testing.assert_close(
        BCEWithLogitsLoss()(pred, binary, mask),
        F.binary_cross_entropy_with_logits(pred[mask], binary[mask]),
    )
