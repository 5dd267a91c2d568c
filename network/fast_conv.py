"""3x3 convolution layer with a faster CPU path (Winograd via NNPACK), equal to nn.Conv2d up to
float round-off.

On an AVX2 CPU without AVX-512, oneDNN runs the networks' 3x3 convolutions as direct
convolutions; NNPACK's single-image Winograd F(6x6,3x3) needs ~2-3x fewer CPU-seconds for them
(relative error ~1e-5 per layer instead of ~3e-6). A dilated 3x3 convolution (dilation d,
padding d) is an ordinary 3x3 convolution on each of the d*d interleaved sub-grids of its
input; these are laid out as one (h+d-1)x(w+d-1) mosaic image, one zero row/column between
neighbours acting as their padding, so one NNPACK call serves them all; likewise the images of
a batch, one above the other, where the kernel is large next to the maps. Under autograd the
input gradient is the same kind of convolution (of the output gradient, with the kernel flipped
and its channels transposed), so it takes the NNPACK path too; the weight and bias gradients
are torch's. Used only where it pays off (see `FastConv2d.uses_fast_path`); everything else,
CUDA and autocast included, is plain nn.Conv2d.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

# A mosaic larger than this (area relative to the input) costs more than Winograd saves.
MAX_MOSAIC_GROWTH = 1.75
# Few output channels leave NNPACK's transforms dominant (e.g. the 21-class heads).
MIN_OUT_CHANNELS = 32
# NNPACK runs image by image and wins only on large maps; per image, a call takes the fast path
# when its map has at least MIN_FAST_AREA pixels or in*out*area reaches MIN_FAST_WORK. Measured on
# the 2-core AVX2 EPYC (fast/plain time, bench/RESULTS.md): 512->512 at 41x41 0.72, 256->256 at
# 81x81 0.59, 3->64 at 375x500 0.65 (all taken); 256->256 at 41x41 batch 2 1.1, 128->128 at 32x32
# batch 8 1.8, 32->32 at 20x20 batch 8 3.0 (all left plain: the small-width demo runs 3x faster).
MIN_FAST_AREA = 128 * 128
MIN_FAST_WORK = 2 * 10**8
# A batch is stacked into one NNPACK image when in*out >= this * (in+out)*height*width. Measured
# (stacked/per-image time, batch 2 unless noted): 512->512 at 41x41 0.68, 256->256 at 81x81 0.86,
# 256->256 at 56x56 batch 8 0.66, 128->128 at 81x81 0.98 (share >= 0.01); 256->256 at 161x161
# 1.13, 128->128 at 161x161 1.05 (share 0.005 and 0.0025).
STACK_MIN_KERNEL_SHARE = 0.01

_fast_path_enabled = True


@functools.cache
def nnpack_available() -> bool:
    """Whether NNPACK works here (the first call also initialises it; calls fail before that)."""
    return bool(torch._nnpack_available())


def set_fast_conv(enabled: bool) -> None:
    """Switch the NNPACK path of every FastConv2d on or off (on by default)."""
    global _fast_path_enabled
    _fast_path_enabled = bool(enabled)


@contextlib.contextmanager
def plain_convolution() -> Iterator[None]:
    """Within the block every FastConv2d runs as plain nn.Conv2d (the released computation)."""
    previous = _fast_path_enabled
    set_fast_conv(False)
    try:
        yield
    finally:
        set_fast_conv(previous)


def mosaic_growth(height: int, width: int, dilation: int) -> float:
    """Area of the sub-grid mosaic of a (height, width) map relative to the map itself."""
    return (height + dilation - 1) * (width + dilation - 1) / (height * width)


@functools.lru_cache(maxsize=64)
def mosaic_indices(batch: int, height: int, width: int, dilation: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat pixel indices (gather, scatter) between a batch of (height, width) maps and its mosaic:
    gather[m] is the batch pixel (image-major) at mosaic pixel m, or batch*height*width (one past
    the maps: a zero) for a separator; scatter[p] is the mosaic pixel of batch pixel p. Along each
    side, sub-grid r (positions r, r+d, ...) follows sub-grid r-1 after one separator, so an
    image's mosaic is (height+d-1, width+d-1); the images' mosaics stand one above the other with
    one separator row between neighbours."""
    def side(size: int) -> list[int]:
        order: list[int] = []
        for offset in range(dilation):
            order.extend(([-1] if offset else []) + list(range(offset, size, dilation)))
        return order

    image_rows = side(height)
    rows = torch.tensor([-1 if row < 0 else row + image * height
                         for image in range(batch) for row in ([-1] if image else []) + image_rows])
    cols = torch.tensor(side(width))
    separator = (rows[:, None] < 0) | (cols[None, :] < 0)
    gather = torch.where(separator, batch * height * width, rows[:, None] * width + cols[None, :]).flatten()
    inside = ~separator.flatten()
    scatter = torch.empty(batch * height * width, dtype=torch.long)
    scatter[gather[inside]] = torch.nonzero(inside).flatten()
    return gather, scatter


def _nnpack_same_conv3x3(image: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """NNPACK's padding-1 stride-1 convolution of one contiguous (1,C,H,W) image."""
    return torch._nnpack_spatial_convolution(image, weight, bias, [1, 1], [1, 1])


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     dilation: int = 1) -> torch.Tensor:
    """conv2d(x, weight, bias, padding=dilation, dilation=dilation) for 3x3 weights, by NNPACK."""
    batch, channels, height, width = x.shape
    out_channels = weight.shape[0]
    # NNPACK's fast algorithm takes one image. A batch becomes one image (the images one above the
    # other, a zero row between neighbours) when the kernel, transformed once per call, is large
    # next to the maps that stacking copies; dilated layers always are.
    small_kernel = channels * out_channels < STACK_MIN_KERNEL_SHARE * (channels + out_channels) * height * width
    if dilation == 1 and (batch == 1 or small_kernel):
        outputs = [_nnpack_same_conv3x3(x[i:i + 1].contiguous(), weight, bias) for i in range(batch)]
        return outputs[0] if batch == 1 else torch.cat(outputs)
    if dilation == 1:
        # The mosaic of an undilated map is the map itself: strided copies, cheaper than a gather.
        stacked = x.new_empty(channels, batch, height + 1, width)
        stacked[:, :, height] = 0  # the last one is surplus: slicing it off would cost a copy
        stacked[:, :, :height] = x.transpose(0, 1)
        out = _nnpack_same_conv3x3(stacked.view(1, channels, -1, width), weight, bias)
        return out.view(-1, batch, height + 1, width)[:, :, :height].transpose(0, 1).contiguous()
    gather, scatter = mosaic_indices(batch, height, width, dilation)
    source = x.new_empty(channels, batch * height * width + 1)
    source[:, -1] = 0  # what the separators read
    source[:, :-1].view(channels, batch, height * width).copy_(x.reshape(batch, channels, -1).transpose(0, 1))
    mosaic = source.index_select(1, gather).view(1, channels, -1, width + dilation - 1)
    out = _nnpack_same_conv3x3(mosaic, weight, bias).view(out_channels, -1).index_select(1, scatter)
    return out.view(-1, batch, height, width).transpose(0, 1).contiguous()


class WinogradConv3x3Function(torch.autograd.Function):
    """winograd_conv3x3 with its gradients: input gradient by NNPACK (the transposed convolution of
    a stride-1 'same' 3x3 convolution is one with the flipped, channel-transposed kernel), weight
    and bias gradients by torch's convolution backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                dilation: int) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.dilation = dilation
        ctx.has_bias = bias is not None
        return winograd_conv3x3(x, weight, bias, dilation)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_output: torch.Tensor):
        x, weight = ctx.saved_tensors
        d = ctx.dilation
        grad_output = grad_output.contiguous()
        # Few input channels = few outputs of the gradient convolution: NNPACK does not pay off.
        input_by_winograd = ctx.needs_input_grad[0] and weight.shape[1] >= MIN_OUT_CHANNELS
        mask = [ctx.needs_input_grad[0] and not input_by_winograd, ctx.needs_input_grad[1],
                ctx.has_bias and ctx.needs_input_grad[2]]
        grad_x = grad_weight = grad_bias = None
        if any(mask):
            grad_x, grad_weight, grad_bias = torch.ops.aten.convolution_backward(
                grad_output, x, weight, [weight.shape[0]] if ctx.has_bias else None,
                [1, 1], [d, d], [d, d], False, [0, 0], 1, mask)
        if input_by_winograd:
            flipped = weight.flip(2, 3).transpose(0, 1).contiguous()
            grad_x = winograd_conv3x3(grad_output, flipped, None, d)
        return grad_x, grad_weight, grad_bias, None


class FastConv2d(nn.Conv2d):
    """nn.Conv2d (same parameters, names and init) whose 3x3 stride-1 CPU forward uses NNPACK."""

    def uses_fast_path(self, x: torch.Tensor, weight: torch.Tensor) -> bool:
        """Whether this call takes the NNPACK path (CPU float32, no autocast, a 3x3 stride-1
        zero-padded conv with padding == dilation, enough output channels, enough work per image
        (MIN_FAST_AREA, MIN_FAST_WORK), small mosaic growth)."""
        dilation = self.dilation[0]
        if not (_fast_path_enabled and x.device.type == "cpu" and x.dim() == 4
                and x.dtype == torch.float32 and weight.dtype == torch.float32
                and self.kernel_size == (3, 3) and self.stride == (1, 1) and self.groups == 1
                and self.padding_mode == "zeros" and self.dilation == (dilation, dilation)
                and self.padding == self.dilation and self.out_channels >= MIN_OUT_CHANNELS
                and not torch.is_autocast_enabled("cpu")):
            return False
        area = x.shape[2] * x.shape[3]
        if area < MIN_FAST_AREA and self.in_channels * self.out_channels * area < MIN_FAST_WORK:
            return False
        if mosaic_growth(x.shape[2], x.shape[3], dilation) > MAX_MOSAIC_GROWTH:
            return False
        return nnpack_available()

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if not self.uses_fast_path(x, weight):
            return super()._conv_forward(x, weight, bias)
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias)):
            return WinogradConv3x3Function.apply(x, weight, bias, self.dilation[0])
        return winograd_conv3x3(x, weight, bias, self.dilation[0])
