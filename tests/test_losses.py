import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tool.dense_energy import DenseEnergyLoss
from tool.losses import bcd_loss, classification_loss, joint_loss, split_cross_entropy

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

BCD_CASES = ("fg_and_bg", "no_bg", "no_fg", "one_image_no_bg")


def _seg_from_classes(pixel_classes: torch.Tensor, seed: int) -> torch.Tensor:
    """Seg scores (B,21,h,w) whose argmax is pixel_classes, with random non-winning scores."""
    generator = torch.Generator().manual_seed(seed)
    scores = torch.rand((pixel_classes.shape[0], 21) + pixel_classes.shape[1:], generator=generator)
    return scores + 5 * F.one_hot(pixel_classes, 21).permute(0, 3, 1, 2)


def _bcd_per_pixel_loop(seg: torch.Tensor, feature: torch.Tensor) -> float:
    """SPEC §8 BCD computed pixel by pixel in float64."""
    seg, feature = seg.double(), feature.double()
    batch, _, height, width = seg.shape
    classes = seg.argmax(1)

    def cos(a, b):
        return float(a @ b) / (float(a.norm() * b.norm()) + 1e-7)

    def centre_and_term(pixels):
        centre = sum(pixels) / (len(pixels) + 1e-7)
        return centre, sum(1 - cos(f, centre) for f in pixels) / (len(pixels) + 1e-7)

    terms, bg_centres = [], []
    for i in range(batch):
        pixels = [feature[i, :, y, x] for y in range(height) for x in range(width) if classes[i, y, x] == 0]
        if pixels:
            centre, term = centre_and_term(pixels)
        else:
            centre, term = torch.zeros(feature.shape[1], dtype=torch.float64), 2.0
        bg_centres.append(centre)
        terms.append(term)
    fg_centres = []
    for c in range(1, 21):
        pixels = [feature[i, :, y, x] for i in range(batch) for y in range(height) for x in range(width)
                  if classes[i, y, x] == c]
        if pixels:
            centre, term = centre_and_term(pixels)
            fg_centres.append(centre)
            terms.append(term)
    pixel_term = sum(terms) / (len(fg_centres) + batch)
    if not fg_centres:
        return pixel_term
    pairs = [1 + cos(a, b) for j, a in enumerate(fg_centres) for k, b in enumerate(fg_centres) if j != k]
    fg_fg = sum(pairs) / len(pairs) if pairs else 0.0
    if not any((classes == 0).flatten().tolist()):
        return 0.5 * fg_fg + 1 + pixel_term
    fg_bg = [1 + cos(a, b) for a in fg_centres for b in bg_centres]
    return 0.5 * fg_fg + 0.5 * sum(fg_bg) / len(fg_bg) + pixel_term


def _bcd_branch_classes() -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(7)
    mixed = torch.randint(0, 4, (2, 4, 5), generator=generator) * 3   # classes 0, 3, 6, 9
    one_image_no_bg = mixed.clone()
    one_image_no_bg[1][one_image_no_bg[1] == 0] = 6
    return {"fg_and_bg": mixed,
            "no_bg": torch.where(mixed == 0, torch.full_like(mixed, 12), mixed),
            "no_fg": torch.zeros_like(mixed),
            "one_image_no_bg": one_image_no_bg,
            "single_fg_class": torch.where(mixed == 0, mixed, torch.full_like(mixed, 20))}


@pytest.mark.parametrize("case", BCD_CASES)
def test_bcd_matches_released_code_vectors(case):
    data = np.load(os.path.join(DATA, "bcd.npz"))
    value = bcd_loss(torch.from_numpy(data[f"{case}__seg"]), torch.from_numpy(data[f"{case}__feature"]))
    assert math.isclose(value.item(), float(data[f"{case}__expected"]), rel_tol=1e-5)


@pytest.mark.parametrize("case", list(_bcd_branch_classes()))
def test_bcd_equals_per_pixel_loop_on_every_branch(case):
    pixel_classes = _bcd_branch_classes()[case]
    seg = _seg_from_classes(pixel_classes, seed=1)
    feature = torch.randn((2, 6) + pixel_classes.shape[1:], generator=torch.Generator().manual_seed(2))
    assert math.isclose(bcd_loss(seg, feature).item(), _bcd_per_pixel_loop(seg, feature), rel_tol=1e-5)


def test_bcd_gradient_reaches_the_features_only():
    seg = _seg_from_classes(_bcd_branch_classes()["fg_and_bg"], seed=3).requires_grad_()
    feature = torch.randn(2, 6, 4, 5, requires_grad=True)
    bcd_loss(seg, feature).backward()
    assert seg.grad is None or not seg.grad.any()
    assert torch.isfinite(feature.grad).all() and feature.grad.abs().sum() > 0


def test_classification_loss_is_multilabel_soft_margin():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.0, 4.0]])
    labels = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]])
    per_class = -(labels * torch.log(torch.sigmoid(logits)) + (1 - labels) * torch.log(torch.sigmoid(-logits)))
    assert math.isclose(classification_loss(logits, labels).item(), per_class.mean().item(), rel_tol=1e-6)
    with pytest.raises(ValueError, match="same"):
        classification_loss(logits, labels[:, :2])


def _split_ce_per_pixel(logits: torch.Tensor, label: torch.Tensor) -> float:
    log_probs = torch.log_softmax(logits.double(), dim=1)
    bg, fg = [], []
    for i, y, x in np.ndindex(*label.shape):
        value = int(label[i, y, x])
        if value == 0:
            bg.append(-float(log_probs[i, 0, y, x]))
        elif value != 255:
            fg.append(-float(log_probs[i, value, y, x]))
    return (sum(bg) / len(bg) if bg else 0.0) + (sum(fg) / len(fg) if fg else 0.0)


@pytest.mark.parametrize("batch", [1, 2])
def test_split_cross_entropy_equals_per_pixel_loop(batch):
    generator = torch.Generator().manual_seed(batch)
    logits = torch.randn(batch, 21, 6, 7, generator=generator)
    label = torch.randint(0, 21, (batch, 6, 7), generator=generator)
    label[:, :2] = 255
    label[:, 5] = 0
    assert math.isclose(split_cross_entropy(logits, label).item(), _split_ce_per_pixel(logits, label),
                        rel_tol=1e-5)


def test_split_cross_entropy_without_valid_pixels_is_zero_not_nan():
    logits = torch.randn(2, 21, 3, 4, requires_grad=True)
    all_ignored = torch.full((2, 3, 4), 255)
    loss = split_cross_entropy(logits, all_ignored)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logits.grad, torch.zeros_like(logits))
    only_background = torch.zeros((2, 3, 4), dtype=torch.long)
    expected = -torch.log_softmax(logits.detach(), 1)[:, 0].mean().item()
    assert math.isclose(split_cross_entropy(logits, only_background).item(), expected, rel_tol=1e-6)


def test_split_cross_entropy_rejects_mismatched_label():
    with pytest.raises(ValueError, match="pseudo_label"):
        split_cross_entropy(torch.zeros(2, 21, 4, 4), torch.zeros(2, 4, 5))


def _joint_inputs():
    data = np.load(os.path.join(DATA, "joint_loss.npz"))
    seg_logits = torch.from_numpy(data["seg_logits"]).requires_grad_()
    return (data, seg_logits, torch.from_numpy(data["pseudo_label"]),
            torch.from_numpy(data["original_images"]), torch.from_numpy(data["roi"]))


def test_joint_loss_cross_entropy_matches_released_code_vector():
    data, seg_logits, pseudo_label, images, roi = _joint_inputs()
    logits = torch.tensor([[1.0] * 20, [-1.0] * 20])
    labels = torch.zeros(2, 20)
    labels[:, 4] = 1
    total, logged = joint_loss(logits, labels, seg_logits, pseudo_label, images, roi, dense_energy=None)
    assert set(logged) == {"cls", "ce", "total"}
    assert math.isclose(logged["ce"], float(data["ce"]), rel_tol=1e-5)
    assert math.isclose(logged["cls"], classification_loss(logits, labels).item(), rel_tol=1e-6)
    assert math.isclose(total.item(), logged["cls"] + logged["ce"], rel_tol=1e-6)


def test_joint_loss_with_dense_energy_matches_released_code_vectors():
    data, seg_logits, pseudo_label, images, roi = _joint_inputs()
    logits, labels = torch.tensor([[0.5] * 20, [-2.0] * 20]), torch.ones(2, 20)
    total, logged = joint_loss(logits, labels, seg_logits, pseudo_label, images, roi,
                               DenseEnergyLoss(weight=1e-7, sigma_rgb=15, sigma_xy=100, scale_factor=0.5))
    assert set(logged) == {"cls", "ce", "dense", "total"}
    assert math.isclose(logged["ce"], float(data["ce"]), rel_tol=1e-5)
    assert math.isclose(logged["dense"], float(data["dense"]), rel_tol=1e-5)
    assert math.isclose(total.item(), logged["cls"] + logged["ce"] + logged["dense"], rel_tol=1e-6)
    total.backward()  # the classification term does not depend on seg_logits
    expected = data["grad_seg_logits"]
    assert np.abs(seg_logits.grad.numpy() - expected).max() <= 1e-4 * np.abs(expected).max()


def test_joint_loss_adds_bcd_for_the_attention_variant_and_accepts_numpy_labels():
    data, seg_logits, pseudo_label, images, roi = _joint_inputs()
    feature = torch.randn(2, 16, 10, 12, requires_grad=True)
    logits, labels = torch.zeros(2, 20), torch.ones(2, 20)
    total, logged = joint_loss(logits, labels, seg_logits, pseudo_label.numpy(), images, roi,
                               dense_energy=None, seg_feature=feature)
    assert math.isclose(logged["bcd"], bcd_loss(seg_logits, feature).item(), rel_tol=1e-6)
    assert math.isclose(total.item(), logged["cls"] + logged["ce"] + logged["bcd"], rel_tol=1e-6)
    total.backward()
    assert feature.grad.abs().sum() > 0 and torch.isfinite(seg_logits.grad).all()


def test_joint_loss_batch_of_one():
    _, seg_logits, pseudo_label, images, roi = _joint_inputs()
    total, logged = joint_loss(torch.zeros(1, 20), torch.ones(1, 20), seg_logits[:1], pseudo_label[:1],
                               images[:1], roi[:1], dense_energy=None)
    total.backward()
    assert math.isfinite(logged["total"]) and seg_logits.grad[:1].abs().sum() > 0
