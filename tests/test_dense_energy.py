"""Dense energy loss (SPEC §6) over the permutohedral filter."""
import os

import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from skimage import data as skimage_data

from tool.bilateral import bilateral_filter
from tool.dense_energy import DenseEnergyLoss, DenseEnergyLossFunction

DATA = os.path.join(os.path.dirname(__file__), "data")


def random_inputs(seed: int, batch: int = 2, height: int = 12, width: int = 16):
    generator = torch.Generator().manual_seed(seed)
    images = torch.rand(batch, 3, height, width, generator=generator) * 255
    probs = torch.softmax(3 * torch.randn(batch, 21, height, width, generator=generator), dim=1)
    roi = torch.ones(batch, height, width)
    roi[:, :, -3:] = 0
    label = torch.randint(0, 21, (batch, height, width), generator=generator)
    label[:, :4] = 255
    return images, probs, roi, label


def test_matches_released_loss_value():
    vectors = np.load(os.path.join(DATA, "joint_loss.npz"))
    images = torch.from_numpy(vectors["original_images"]).float()
    logits = torch.from_numpy(vectors["seg_logits"])
    probs = torch.softmax(F.interpolate(logits, size=images.shape[2:], mode="bilinear", align_corners=False), dim=1)
    loss = DenseEnergyLoss()(images, probs, torch.from_numpy(vectors["roi"]), torch.from_numpy(vectors["pseudo_label"]))
    assert loss.shape == ()
    assert loss.item() == pytest.approx(float(vectors["dense"]), rel=1e-5)


def test_zero_roi_gives_zero_loss_and_gradient():
    images, probs, roi, label = random_inputs(0)
    probs.requires_grad_(True)
    loss = DenseEnergyLoss()(images, probs, torch.zeros_like(roi), label)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(probs.grad) == 0


def test_confident_labelled_pixels_have_zero_gate():
    # one-hot probabilities inside the ROI and no unlabelled pixel: gate = max(1 − 1, 0) = 0
    images, _, _, label = random_inputs(1)
    probs = F.one_hot(label.clamp(max=20), 21).permute(0, 3, 1, 2).float()
    loss = DenseEnergyLoss(scale_factor=1.0)(images, probs, torch.ones(label.shape), label.clamp(max=20))
    assert loss.item() == 0.0


def test_all_unlabelled_uses_gate_one():
    images, probs, roi, _ = random_inputs(2)
    label = torch.full(roi.shape, 255)
    weight, sigma_rgb, sigma_xy = 1e-3, 15.0, 100.0
    loss = DenseEnergyLoss(weight=weight, sigma_rgb=sigma_rgb, sigma_xy=sigma_xy)(images, probs, roi, label)
    # Independent downscaling at 0.5: nearest = every other pixel, bilinear = 2×2 mean.
    masked = F.avg_pool2d(probs, 2) * roi[:, None, ::2, ::2]
    filtered = bilateral_filter(images[:, :, ::2, ::2], masked, sigma_rgb, sigma_xy * 0.5)
    expected = -weight * (masked.double().numpy() * filtered).sum() / images.shape[0]
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def filter_matrix(image: torch.Tensor, sigma_rgb: float, sigma_xy: float) -> np.ndarray:
    """The lattice as a dense (P, P) matrix: column j = filtered j-th unit vector."""
    _, height, width = image.shape
    points = height * width
    unit_vectors = np.eye(points, dtype=np.float32).reshape(1, points, height, width)
    return bilateral_filter(image[None], unit_vectors, sigma_rgb, sigma_xy)[0].reshape(points, points).T


def test_gradient_matches_finite_differences_with_gate_fixed():
    # Every pixel unlabelled: the gate is 1 whatever the probabilities, and the loss
    # −⟨S, W S⟩/B is quadratic, so central differences give its exact gradient −(W + Wᵀ)S·ROI/B.
    # The released gradient −2·W S·ROI/B equals it as far as the lattice is symmetric
    # (measured relative difference 1.1% here), and the residual is exactly the asymmetry.
    batch, channels, height, width, sigma_rgb, sigma_xy = 2, 3, 6, 8, 15.0, 6.0
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(batch, 3, height, width, generator=generator) * 255
    probs = torch.softmax(3 * torch.randn(batch, channels, height, width, generator=generator), dim=1).double()
    roi = torch.ones(batch, height, width, dtype=torch.float64)
    roi[:, :, -2:] = 0
    unlabelled = torch.ones(batch, height, width, dtype=torch.bool)

    def loss_at(p: torch.Tensor) -> torch.Tensor:
        return DenseEnergyLossFunction.apply(images, p, roi, unlabelled, sigma_rgb, sigma_xy, "pydensecrf")

    probs.requires_grad_(True)
    loss_at(probs).backward()
    analytic = probs.grad.flatten()
    numeric = torch.zeros(probs.numel(), dtype=torch.float64)
    with torch.no_grad():
        for index in range(probs.numel()):
            step = torch.zeros(probs.numel(), dtype=torch.float64)
            step[index] = 0.05
            step = step.view_as(probs)
            numeric[index] = (loss_at(probs + step) - loss_at(probs - step)).item() / 0.1

    masked = (probs.detach() * roi[:, None]).numpy().reshape(batch, channels, -1)
    exact = np.zeros_like(masked)
    for n in range(batch):
        matrix = filter_matrix(images[n], sigma_rgb, sigma_xy).astype(np.float64)
        exact[n] = -masked[n] @ (matrix + matrix.T) * roi[n].reshape(1, -1).numpy() / batch
    exact = torch.from_numpy(exact).flatten()
    torch.testing.assert_close(numeric, exact, rtol=1e-4, atol=1e-6 * exact.abs().max().item())
    assert torch.linalg.norm(analytic - numeric) <= 0.02 * torch.linalg.norm(numeric)
    assert torch.count_nonzero(analytic.view_as(probs)[:, :, :, -2:]) == 0


def test_gradient_formula_on_cpu_module():
    # gradient w.r.t. the scaled probabilities is −2·AS·ROI/B·weight (gate held constant)
    images, probs, roi, label = random_inputs(4)
    scaled_probs = F.avg_pool2d(probs, 2).requires_grad_(True)
    scaled_roi, scaled_label = roi[:, ::2, ::2], label[:, ::2, ::2]
    loss = DenseEnergyLoss(weight=1e-4, scale_factor=1.0)(images[:, :, ::2, ::2], scaled_probs, scaled_roi, scaled_label)
    loss.backward()
    masked = scaled_probs.detach() * scaled_roi[:, None]
    gate = torch.clamp(scaled_roi - scaled_probs.detach().max(1)[0], min=0)
    gate[scaled_label == 255] = 1
    filtered = torch.from_numpy(bilateral_filter(images[:, :, ::2, ::2], masked, 15.0, 100.0)) * gate[:, None]
    expected = -2 * filtered * scaled_roi[:, None] / 2 * 1e-4
    torch.testing.assert_close(scaled_probs.grad, expected, rtol=1e-5, atol=1e-12)


def test_batch_of_one_and_inputs_unchanged():
    images, probs, roi, label = random_inputs(5, batch=1)
    before = [t.clone() for t in (images, probs, roi, label)]
    probs.requires_grad_(True)
    loss = DenseEnergyLoss()(images, probs, roi, label)
    loss.backward()
    assert loss.shape == () and loss.device == probs.device and loss.item() < 0
    assert probs.grad.shape == probs.shape
    for tensor, original in zip((images, probs.detach(), roi, label), before):
        torch.testing.assert_close(tensor, original, rtol=0, atol=0)


def test_rejects_mismatched_shapes():
    images, probs, roi, label = random_inputs(6)
    with pytest.raises(ValueError, match="roi must have shape \\(2, 12, 16\\)"):
        DenseEnergyLoss()(images, probs, roi[:, :, :8], label)
    with pytest.raises(ValueError, match="images must have shape \\(2, 3, 12, 16\\)"):
        DenseEnergyLoss()(images[:1], probs, roi, label)
    with pytest.raises(ValueError, match="sigma_xy must be > 0"):
        DenseEnergyLoss(sigma_xy=0.0)


@pytest.mark.parametrize("case", ["vectors", "photographs"])
def test_torch_backend_loss_and_gradient_match_the_cpp_filter(case):
    if case == "vectors":
        vectors = np.load(os.path.join(DATA, "joint_loss.npz"))
        images = torch.from_numpy(vectors["original_images"]).float()
        logits = F.interpolate(torch.from_numpy(vectors["seg_logits"]), size=images.shape[-2:], mode="bilinear",
                               align_corners=False)
        roi, label = torch.from_numpy(vectors["roi"]), torch.from_numpy(vectors["pseudo_label"]).long()
    else:
        photos = [cv2.resize(getattr(skimage_data, name)(), (96, 80), interpolation=cv2.INTER_AREA)
                  for name in ("astronaut", "chelsea")]
        images = torch.from_numpy(np.stack(photos).transpose(0, 3, 1, 2).copy()).float()
        generator = torch.Generator().manual_seed(11)
        logits = F.avg_pool2d(4 * torch.randn(2, 21, 80, 96, generator=generator), 9, stride=1, padding=4)
        roi = torch.ones(2, 80, 96)
        roi[1, :, 80:] = 0
        label = torch.randint(0, 21, (2, 80, 96), generator=generator)
        label[:, ::3] = 255
    results = {}
    for backend in ("pydensecrf", "torch"):
        probs = torch.softmax(logits.clone(), dim=1).requires_grad_(True)
        loss = DenseEnergyLoss(backend=backend)(images, probs, roi, label)
        loss.backward()
        results[backend] = (loss.item(), probs.grad)
    (cpp_loss, cpp_grad), (torch_loss, torch_grad) = results["pydensecrf"], results["torch"]
    assert cpp_loss < 0 and torch_loss == pytest.approx(cpp_loss, rel=1e-4)
    assert (torch_grad - cpp_grad).abs().max() <= 1e-4 * cpp_grad.abs().max()


def test_unknown_backend_is_refused_when_built():
    with pytest.raises(ValueError, match="--crf_backend must be one of"):
        DenseEnergyLoss(backend="cuda")
