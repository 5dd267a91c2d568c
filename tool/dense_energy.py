"""Dense energy (regularised CRF) loss of SPEC §6 over the permutohedral bilateral filter."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tool.bilateral import bilateral_filter
from tool.crf import resolve_crf_backend
from tool.lattice import bilateral_filter_torch
from voc12.lists import IGNORE_LABEL


class DenseEnergyLossFunction(torch.autograd.Function):
    """loss = −⟨S, gate·W S⟩ / B with S = probs·ROI; gradient −2·gate·W S·ROI / B (gate constant)."""

    @staticmethod
    def forward(
        ctx,
        images: torch.Tensor,
        probs: torch.Tensor,
        roi: torch.Tensor,
        unlabelled: torch.Tensor,
        sigma_rgb: float,
        sigma_xy: float,
        backend: str,
    ) -> torch.Tensor:
        batch = probs.shape[0]
        roi = roi.to(device=probs.device, dtype=probs.dtype)
        unlabelled = unlabelled.to(probs.device)
        gate = torch.clamp(roi - probs.max(dim=1)[0], min=0)
        gate = torch.where(unlabelled, torch.ones_like(gate), gate)
        masked = probs * roi.unsqueeze(1)
        if backend == "torch":
            filtered = bilateral_filter_torch(images.float(), masked.float(), sigma_rgb, sigma_xy)
        else:
            # The C++ lattice runs on the CPU; its result returns to the inputs' device.
            filtered = torch.from_numpy(bilateral_filter(images, masked, sigma_rgb, sigma_xy)).to(probs.device)
        gated = filtered.to(dtype=probs.dtype) * gate.unsqueeze(1)
        loss = -(masked.double() * gated.double()).sum() / batch
        ctx.save_for_backward(gated * roi.unsqueeze(1))
        ctx.batch = batch
        return loss.to(probs.dtype)

    @staticmethod
    def backward(ctx, grad_output: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        (gated_roi,) = ctx.saved_tensors
        grad_probs = -2.0 * grad_output * gated_roi / ctx.batch
        return None, grad_probs, None, None, None, None, None


class DenseEnergyLoss(nn.Module):
    """Released defaults: weight 1e-7, sigma_rgb 15, sigma_xy 100, evaluated at scale 0.5.

    backend (a --crf_backend value): 'pydensecrf' filters with the released C++ lattice on the CPU,
    'torch' with the PyTorch lattice on the inputs' device, 'auto' picks torch for CUDA inputs.
    """

    def __init__(
        self, weight: float = 1e-7, sigma_rgb: float = 15.0, sigma_xy: float = 100.0, scale_factor: float = 0.5,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        resolve_crf_backend(backend, "cpu")  # rejects an unknown name now, not at the first step
        for name, value in (("sigma_rgb", sigma_rgb), ("sigma_xy", sigma_xy)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if not 0 < scale_factor <= 1:
            raise ValueError(f"scale_factor must be in (0, 1], got {scale_factor}")
        self.weight = weight
        self.sigma_rgb = sigma_rgb
        self.sigma_xy = sigma_xy
        self.scale_factor = scale_factor
        self.backend = backend

    def forward(
        self, images: torch.Tensor, probs: torch.Tensor, roi: torch.Tensor, label: torch.Tensor
    ) -> torch.Tensor:
        """images (B,3,H,W) 0..255, probs (B,K,H,W) softmax, roi (B,H,W) 1 = real pixel,
        label (B,H,W) pseudo label with 255 = unlabelled. Returns a scalar tensor."""
        batch, _, height, width = probs.shape
        expected = {"images": (batch, 3, height, width), "roi": (batch, height, width), "label": (batch, height, width)}
        for name, tensor in (("images", images), ("roi", roi), ("label", label)):
            if tuple(tensor.shape) != expected[name]:
                raise ValueError(f"{name} must have shape {expected[name]} to match probs, got {tuple(tensor.shape)}")
        scale = self.scale_factor
        scaled_images = F.interpolate(images.float(), scale_factor=scale)
        scaled_probs = F.interpolate(probs, scale_factor=scale, mode="bilinear", align_corners=False)
        scaled_roi = F.interpolate(roi.unsqueeze(1).float(), scale_factor=scale).squeeze(1)
        scaled_label = F.interpolate(label.unsqueeze(1).float(), scale_factor=scale).squeeze(1)
        unlabelled = scaled_label.long() == IGNORE_LABEL
        return self.weight * DenseEnergyLossFunction.apply(
            scaled_images, scaled_probs, scaled_roi, unlabelled, self.sigma_rgb, self.sigma_xy * scale,
            resolve_crf_backend(self.backend, probs.device),
        )
