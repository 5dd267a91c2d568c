"""network.fast_conv: the NNPACK (Winograd) 3x3 path equals plain convolution up to round-off,
is taken where intended, and the networks give the plain results with it."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from network import fast_conv, rrm, rrm_attention
from network.fast_conv import FastConv2d, mosaic_growth, plain_convolution, winograd_conv3x3

WIDTH = 0.125  # smallest width at which most 3x3 layers have >= MIN_OUT_CHANNELS outputs
pytestmark = pytest.mark.skipif(not fast_conv.nnpack_available(), reason="NNPACK is not built into this torch")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("dilation, height, width", [(1, 13, 17), (2, 13, 17), (4, 21, 30), (12, 30, 41)])
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
    # 47x63 at dilation 4: sub-grids 12x16, with separators 13x17, mosaic 52x68.
    assert mosaic_growth(47, 63, 4) == pytest.approx(52 * 68 / (47 * 63))
    assert mosaic_growth(41, 41, 12) == pytest.approx(60 * 60 / (41 * 41))
    assert mosaic_growth(5, 7, 1) == 1.0


def test_fast_path_is_taken_only_where_intended():
    x = torch.randn(1, 8, 47, 63)
    conv = FastConv2d(8, 32, 3, padding=4, dilation=4)
    with torch.no_grad():
        assert conv.uses_fast_path(x, conv.weight)
        with plain_convolution():
            assert not conv.uses_fast_path(x, conv.weight)
        assert conv.uses_fast_path(x, conv.weight)  # restored after the block
        assert not conv.uses_fast_path(torch.randn(1, 8, 21, 21), conv.weight)  # mosaic 28x28: too large
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert not conv.uses_fast_path(x, conv.weight)
        assert not FastConv2d(8, 21, 3, padding=1).uses_fast_path(x, conv.weight)  # few outputs
        assert not FastConv2d(8, 32, 3, stride=2, padding=1).uses_fast_path(x, conv.weight)
        assert not FastConv2d(8, 32, 1).uses_fast_path(x, conv.weight)
    # While autograd records, only dilation 1 (the mosaic's backward is slow).
    assert not conv.uses_fast_path(x, conv.weight)
    assert FastConv2d(8, 32, 3, padding=1).uses_fast_path(x, conv.weight)


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
    # Plain: < 32 outputs (conv1a, b2 at this width), stride 2, the dilation-12 head on 21x26 (mosaic 36x48).
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
    x = torch.randn(2, 3, 49, 49)

    def gradients() -> dict[str, torch.Tensor]:
        model.zero_grad()
        torch.manual_seed(1)  # same dropout masks in both runs
        logits, cam, seg = model(x)
        (logits.sum() + cam.mean() + seg[0].square().mean()).backward()
        return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}

    fast = gradients()
    with plain_convolution():
        plain = gradients()
    assert fast.keys() == plain.keys() and "b4_1.conv_branch2a.weight" in fast
    for name in plain:
        assert relative_error(fast[name], plain[name]) < 1e-3, name
