"""network.fast_conv: the NNPACK (Winograd) 3x3 path equals plain convolution up to round-off,
is taken where intended, and the networks give the plain results with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from network import fast_conv, rrm, rrm_attention
from network.fast_conv import FastConv2d, mosaic_growth, mosaic_indices, plain_convolution, winograd_conv3x3

WIDTH = 0.125  # smallest width at which most 3x3 layers have >= MIN_OUT_CHANNELS outputs
pytestmark = pytest.mark.skipif(not fast_conv.nnpack_available(), reason="NNPACK is not built into this torch")


PRODUCTION_THRESHOLDS = (fast_conv.MIN_FAST_AREA, fast_conv.MIN_FAST_WORK)  # before any fixture patches them


@pytest.fixture(autouse=True)
def fast_path_on_small_inputs(monkeypatch):
    """The numerical checks run on small maps, which the size thresholds would leave plain."""
    monkeypatch.setattr(fast_conv, "MIN_FAST_AREA", 0)
    monkeypatch.setattr(fast_conv, "MIN_FAST_WORK", 0)


def test_fast_path_needs_a_large_map_or_enough_work(monkeypatch):
    monkeypatch.setattr(fast_conv, "MIN_FAST_AREA", 128 * 128)
    monkeypatch.setattr(fast_conv, "MIN_FAST_WORK", 2 * 10**8)
    conv1a = FastConv2d(3, 64, 3, padding=1, bias=False)
    assert conv1a.uses_fast_path(torch.empty(1, 3, 128, 128), conv1a.weight)  # area 16384: taken
    assert not conv1a.uses_fast_path(torch.empty(8, 3, 127, 128), conv1a.weight)  # per image, not per batch
    wide = FastConv2d(512, 512, 3, padding=1, bias=False)
    assert wide.uses_fast_path(torch.empty(1, 512, 28, 28), wide.weight)  # 512*512*784 = 205.5M >= 200M
    assert not wide.uses_fast_path(torch.empty(1, 512, 27, 28), wide.weight)  # 198.2M
    narrow = FastConv2d(64, 64, 3, padding=1)
    assert not narrow.uses_fast_path(torch.empty(8, 64, 80, 80), narrow.weight)  # 26.2M at 6400 px


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


# (12, 5, 7) and (3, 1, 1): more sub-grids than rows or columns, i.e. empty ones.
@pytest.mark.parametrize("dilation, height, width", [(1, 13, 17), (2, 13, 17), (4, 21, 30), (12, 30, 41),
                                                     (12, 5, 7), (3, 1, 1)])
def test_winograd_conv_equals_float64_convolution(dilation, height, width):
    generator = torch.Generator().manual_seed(dilation)
    x = torch.randn(2, 24, height, width, generator=generator)
    weight = torch.randn(40, 24, 3, 3, generator=generator) / 15
    bias = torch.randn(40, generator=generator)
    expected = F.conv2d(x.double(), weight.double(), bias.double(), padding=dilation, dilation=dilation)
    with torch.no_grad():
        actual = winograd_conv3x3(x, weight, bias, dilation)
    assert actual.shape == expected.shape
    assert relative_error(actual, expected) < 1e-4


def test_mosaic_growth_hand_worked():
    # 47x63 at dilation 4: sub-grids of 12 or 11 rows and 16 or 15 columns, 3 separators each way.
    assert mosaic_growth(47, 63, 4) == pytest.approx(50 * 66 / (47 * 63))
    assert mosaic_growth(41, 41, 12) == pytest.approx(52 * 52 / (41 * 41))
    assert mosaic_growth(5, 7, 1) == 1.0


def test_mosaic_indices_hand_worked():
    # Two 5x3 maps at dilation 2: rows 0 2 4 | 1 3 of each image, a separator row "|" between the
    # images; columns 0 2 | 1. Batch pixel p of image i is 15*i + 3*row + column; 30 is the zero.
    gather, scatter = mosaic_indices(2, 5, 3, 2)
    rows = [0, 2, 4, None, 1, 3, None, 5, 7, 9, None, 6, 8]  # image 1's rows offset by 5
    cols = [0, 2, None, 1]
    expected = [30 if r is None or c is None else 3 * r + c for r in rows for c in cols]
    assert gather.tolist() == expected
    assert [gather[m].item() for m in scatter] == list(range(30))


@pytest.mark.parametrize("batch, in_channels, size", [(2, 40, 13), (3, 8, 30)])
def test_batch_is_stacked_only_for_a_large_kernel(monkeypatch, batch, in_channels, size):
    # 40->48 at 13x13: in*out = 1920 >= 0.01 * 88 * 169 -> one NNPACK call for the batch;
    # 8->48 at 30x30: 384 < 0.01 * 56 * 900 -> one call per image. Both equal float64 convolution.
    calls = []
    nnpack = torch._nnpack_spatial_convolution
    monkeypatch.setattr(torch, "_nnpack_spatial_convolution", lambda *args: calls.append(args[0].shape) or nnpack(*args))
    generator = torch.Generator().manual_seed(batch)
    x = torch.randn(batch, in_channels, size, size, generator=generator)
    weight = torch.randn(48, in_channels, 3, 3, generator=generator) / 10
    actual = winograd_conv3x3(x, weight, None, 1)
    stacked = in_channels == 40
    assert calls == ([(1, in_channels, batch * (size + 1), size)] if stacked else [(1, in_channels, size, size)] * batch)
    assert relative_error(actual, F.conv2d(x.double(), weight.double(), padding=1)) < 1e-4


def test_fast_path_is_taken_only_where_intended():
    x = torch.randn(1, 8, 47, 63)
    conv = FastConv2d(8, 32, 3, padding=4, dilation=4)
    with torch.no_grad():
        assert conv.uses_fast_path(x, conv.weight)
        with plain_convolution():
            assert not conv.uses_fast_path(x, conv.weight)
        assert conv.uses_fast_path(x, conv.weight)  # restored after the block
        assert not conv.uses_fast_path(torch.randn(1, 8, 6, 6), conv.weight)  # mosaic 9x9: too large
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv.uses_fast_path(x, conv.weight)
        assert not FastConv2d(8, 21, 3, padding=1).uses_fast_path(x, conv.weight)  # few outputs
        assert not FastConv2d(8, 32, 3, stride=2, padding=1).uses_fast_path(x, conv.weight)
        assert not FastConv2d(8, 32, 1).uses_fast_path(x, conv.weight)
    # Also while autograd records (the gradients have their own NNPACK-backed function).
    assert conv.uses_fast_path(x, conv.weight)
    assert FastConv2d(8, 32, 3, padding=1).uses_fast_path(x, conv.weight)


@pytest.mark.parametrize("in_channels, dilation, height, width", [(40, 1, 13, 17), (40, 2, 13, 17),
                                                                   (40, 4, 21, 30), (40, 12, 30, 41),
                                                                   (8, 2, 13, 17)])
def test_fast_path_gradients_equal_float64_gradients(in_channels, dilation, height, width):
    # 40 inputs: input gradient by NNPACK (flipped, transposed kernel); 8: by torch's backward.
    generator = torch.Generator().manual_seed(dilation)
    conv = FastConv2d(in_channels, 48, 3, padding=dilation, dilation=dilation, bias=True)
    x = torch.randn(2, in_channels, height, width, generator=generator, requires_grad=True)
    grad_output = torch.randn(2, 48, height, width, generator=generator)
    assert conv.uses_fast_path(x, conv.weight)
    output = conv(x)
    assert output.grad_fn.name() == "WinogradConv3x3FunctionBackward"
    output.backward(grad_output)
    exact = [t.detach().double().requires_grad_() for t in (x, conv.weight, conv.bias)]
    F.conv2d(*exact, padding=dilation, dilation=dilation).backward(grad_output.double())
    assert relative_error(output, F.conv2d(*exact, padding=dilation, dilation=dilation)) < 1e-4
    for actual, expected in zip((x.grad, conv.weight.grad, conv.bias.grad), exact, strict=True):
        assert actual.shape == expected.shape
        assert relative_error(actual, expected.grad) < 1e-4


def test_fast_path_gradient_of_the_input_only():
    # Frozen weights (no weight/bias gradient wanted): only the input gradient is computed.
    conv = FastConv2d(40, 32, 3, padding=2, dilation=2).requires_grad_(False)
    x = torch.randn(1, 40, 15, 19, requires_grad=True)
    conv(x).sum().backward()
    expected = torch.autograd.grad(F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), padding=2,
                                            dilation=2).sum(), x)[0]
    assert conv.weight.grad is None and relative_error(x.grad, expected) < 1e-4


def fast_layer_names(model: torch.nn.Module, run) -> list[str]:
    """Names of the FastConv2d layers that take the NNPACK path during `run()`."""
    taken: list[str] = []

    def record(name: str):
        def hook(module: FastConv2d, inputs: tuple) -> None:
            if module.uses_fast_path(inputs[0], module.weight):
                taken.append(name)
        return hook

    hooks = [module.register_forward_pre_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, FastConv2d)]
    run()
    for hook in hooks:
        hook.remove()
    return taken


@pytest.mark.parametrize("cls", [rrm.SegNet, rrm_attention.SegNet])
def test_networks_fast_path_equals_plain_path(cls):
    torch.manual_seed(0)
    model = cls(width=WIDTH).eval()
    x = torch.randn(1, 3, 161, 201)  # 21x26 at 1/8: mosaics of dilation 2 and 4 are small enough
    with torch.no_grad():
        fast_names = fast_layer_names(model, lambda: model.predict_seg(x))
        fast_seg = model.predict_seg(x)
        fast_training = model(x)
        with plain_convolution():
            assert fast_layer_names(model, lambda: model.predict_seg(x)) == []
            plain_seg = model.predict_seg(x)
            plain_training = model(x)
    # Plain: < 32 outputs (conv1a, b2 at this width), stride 2, the dilation-12 head on 21x26 (mosaic 32x37).
    assert {"b3_1.conv_branch2a", "b4_5.conv_branch2a", "b5_1.conv_branch2a", "b7.conv_branch2b1"} <= set(fast_names)
    assert not {"conv1a", "b2_1.conv_branch2a", "b4.conv_branch2a", "fc8_seg_conv1"} & set(fast_names)
    assert relative_error(fast_seg, plain_seg) < 1e-4
    flat_fast = [t for item in fast_training for t in (item if isinstance(item, list) else [item])]
    flat_plain = [t for item in plain_training for t in (item if isinstance(item, list) else [item])]
    for fast, plain in zip(flat_fast, flat_plain, strict=True):
        assert relative_error(fast, plain) < 1e-4


def test_training_gradients_equal_plain_path():
    torch.manual_seed(0)
    model = rrm.SegNet(width=WIDTH).train()
    # 7x7 at 1/8: the dilated layers run plain (the per-layer test above covers their gradients);
    # at 25x25 they take the fast path too, and the forward's round-off alone then moves some
    # weight gradients of this random-init network by up to ~4e-3 (as much with torch's backward).
    x = torch.randn(2, 3, 49, 49)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs
        logits, cam, seg = model(x)
        (logits.sum() + cam.mean() + seg[0].square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    recorded: set[str] = set()  # layers whose graph node is the NNPACK-backed function

    def record(name: str):
        def hook(module: FastConv2d, inputs: tuple, output: torch.Tensor) -> None:
            if output.grad_fn is not None and output.grad_fn.name() == "WinogradConv3x3FunctionBackward":
                recorded.add(name)
        return hook

    hooks = [module.register_forward_hook(record(name))
             for name, module in model.named_modules() if isinstance(module, FastConv2d)]
    fast = gradients()
    for hook in hooks:
        hook.remove()
    with plain_convolution():
        plain = gradients()
    assert {"b3_1.conv_branch2a", "b4_1.conv_branch2a", "b4_5.conv_branch2b1"} <= recorded
    assert fast.keys() == plain.keys() and "b4_1.conv_branch2a.weight" in fast
    for name in plain:
        assert relative_error(fast[name], plain[name]) < 1e-3, name


def test_small_width_training_runs_plain_convolutions(monkeypatch):
    # The demo's size (width 0.125, crop 80, batch 8), where NNPACK was 3x slower than oneDNN.
    monkeypatch.setattr(fast_conv, "MIN_FAST_AREA", PRODUCTION_THRESHOLDS[0])
    monkeypatch.setattr(fast_conv, "MIN_FAST_WORK", PRODUCTION_THRESHOLDS[1])
    model = rrm.SegNet(width=0.125).train()
    assert fast_layer_names(model, lambda: model(torch.randn(8, 3, 80, 80))) == []
