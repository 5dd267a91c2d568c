"""Networks of SPEC §2-4: exact names/shapes, parity with the released code, modes, freezing."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import network
from network import resnet38d, rrm, rrm_attention

DATA = Path(__file__).parent / "data"
SMALL = 0.0625

# SPEC §2 stages: (name, kind, in, mid, out, stride); "bot" blocks use out/4 and out/2 inside.
BACKBONE_BLOCKS = [
    ("b2", "basic", 64, 128, 128, 2), ("b2_1", "basic", 128, 128, 128, 1), ("b2_2", "basic", 128, 128, 128, 1),
    ("b3", "basic", 128, 256, 256, 2), ("b3_1", "basic", 256, 256, 256, 1), ("b3_2", "basic", 256, 256, 256, 1),
    ("b4", "basic", 256, 512, 512, 2), ("b4_1", "basic", 512, 512, 512, 1), ("b4_2", "basic", 512, 512, 512, 1),
    ("b4_3", "basic", 512, 512, 512, 1), ("b4_4", "basic", 512, 512, 512, 1), ("b4_5", "basic", 512, 512, 512, 1),
    ("b5", "basic", 512, 512, 1024, 1), ("b5_1", "basic", 1024, 512, 1024, 1), ("b5_2", "basic", 1024, 512, 1024, 1),
    ("b6", "bot", 1024, None, 2048, 1), ("b7", "bot", 2048, None, 4096, 1),
]
BN_FIELDS = ("weight", "bias", "running_mean", "running_var")


def batchnorm_shapes(prefix: str, channels: int) -> dict[str, tuple]:
    shapes = {f"{prefix}.{field}": (channels,) for field in BN_FIELDS}
    shapes[f"{prefix}.num_batches_tracked"] = ()
    return shapes


def expected_backbone_shapes() -> dict[str, tuple]:
    shapes = {"conv1a.weight": (64, 3, 3, 3)}
    for name, kind, cin, mid, out, stride in BACKBONE_BLOCKS:
        shapes.update(batchnorm_shapes(f"{name}.bn_branch2a", cin))
        if kind == "basic":
            shapes[f"{name}.conv_branch2a.weight"] = (mid, cin, 3, 3)
            shapes.update(batchnorm_shapes(f"{name}.bn_branch2b1", mid))
            shapes[f"{name}.conv_branch2b1.weight"] = (out, mid, 3, 3)
            if cin != out or stride != 1:
                shapes[f"{name}.conv_branch1.weight"] = (out, cin, 1, 1)
        else:
            shapes[f"{name}.conv_branch2a.weight"] = (out // 4, cin, 1, 1)
            shapes.update(batchnorm_shapes(f"{name}.bn_branch2b1", out // 4))
            shapes[f"{name}.conv_branch2b1.weight"] = (out // 2, out // 4, 3, 3)
            shapes.update(batchnorm_shapes(f"{name}.bn_branch2b2", out // 2))
            shapes[f"{name}.conv_branch2b2.weight"] = (out, out // 2, 1, 1)
            shapes[f"{name}.conv_branch1.weight"] = (out, cin, 1, 1)
    shapes.update(batchnorm_shapes("bn7", 4096))
    return shapes


RRM_HEAD_SHAPES = {
    "fc8.weight": (20, 4096, 1, 1),
    "fc8_seg_conv1.weight": (512, 4096, 3, 3), "fc8_seg_conv1.bias": (512,),
    "fc8_seg_conv2.weight": (21, 512, 3, 3), "fc8_seg_conv2.bias": (21,),
}
ATTENTION_HEAD_SHAPES = {
    "GAU_w1.weight": (256, 4096, 1, 1), "GAU_w2.weight": (256, 4096, 1, 1), "GAU_w3.weight": (256, 4096, 1, 1),
    "fc8_seg_conv3.weight": (256, 512, 3, 3), "fc8_seg_conv4.weight": (21, 256, 3, 3),
}


def shapes_of(model: nn.Module) -> dict[str, tuple]:
    return {key: tuple(value.shape) for key, value in model.state_dict().items()}


def build_on_meta(cls: type, width: float = 1.0) -> nn.Module:
    with torch.device("meta"):
        return cls(width=width)


@pytest.mark.parametrize("cls, heads", [
    (resnet38d.Net, {}),
    (rrm.Net, RRM_HEAD_SHAPES), (rrm.SegNet, RRM_HEAD_SHAPES),
    (rrm_attention.Net, {**RRM_HEAD_SHAPES, **ATTENTION_HEAD_SHAPES}),
    (rrm_attention.SegNet, {**RRM_HEAD_SHAPES, **ATTENTION_HEAD_SHAPES}),
])
def test_state_dict_names_and_shapes_match_spec(cls, heads):
    assert shapes_of(build_on_meta(cls)) == {**expected_backbone_shapes(), **heads}


def test_width_scales_channels_but_not_names_or_class_counts():
    model = build_on_meta(rrm_attention.SegNet, SMALL)
    full = {**expected_backbone_shapes(), **RRM_HEAD_SHAPES, **ATTENTION_HEAD_SHAPES}
    shapes = shapes_of(model)
    assert shapes.keys() == full.keys()
    assert shapes["conv1a.weight"] == (4, 3, 3, 3)
    assert shapes["b7.conv_branch2b1.weight"] == (128, 64, 3, 3)
    assert shapes["bn7.weight"] == (256,)
    assert shapes["fc8.weight"] == (20, 256, 1, 1)
    assert shapes["fc8_seg_conv1.weight"] == (32, 256, 3, 3)
    assert shapes["fc8_seg_conv2.weight"] == (21, 32, 3, 3)
    assert shapes["GAU_w1.weight"] == (16, 256, 1, 1)
    assert shapes["fc8_seg_conv3.weight"] == (16, 32, 3, 3)
    assert shapes["fc8_seg_conv4.weight"] == (21, 16, 3, 3)
    # The tiniest width still gives at least one channel everywhere and a bottleneck divisible by 4.
    tiny = shapes_of(build_on_meta(rrm.SegNet, 1e-4))
    assert tiny["conv1a.weight"] == (1, 3, 3, 3) and tiny["b7.conv_branch2a.weight"] == (1, 4, 1, 1)


@pytest.mark.parametrize("width", [0.0, -1.0])
def test_width_must_be_positive(width):
    with pytest.raises(ValueError, match="width must be a positive"):
        rrm.SegNet(width=width)


def fill_deterministic(model: nn.Module) -> nn.Module:
    """Write the VECTORS.md recipe weights into `model` in place (k-th sorted key,
    s = sin(0.7 i + 1.3 k) in float64, cast to float32)."""
    state = model.state_dict()
    keys = sorted(key for key in state if not key.endswith("num_batches_tracked"))
    largest = max(state[key].numel() for key in keys)
    index = 0.7 * np.arange(largest, dtype=np.float64)
    # sin(a + b) = sin a cos b + cos a sin b: one sin/cos table serves every key.
    sin_index, cos_index = np.sin(index), np.cos(index)
    s_buffer, term_buffer = np.empty(largest), np.empty(largest)
    for k, key in enumerate(keys):
        tensor = state[key]
        n = tensor.numel()
        s, term = s_buffer[:n], term_buffer[:n]
        np.multiply(sin_index[:n], np.cos(1.3 * k), out=s)
        np.multiply(cos_index[:n], np.sin(1.3 * k), out=term)
        s += term
        if key.endswith("running_var"):
            values = 1 + 0.5 * np.abs(s)
        elif key.endswith("running_mean"):
            values = 0.1 * s
        elif tensor.dim() == 1 and key.endswith("weight"):
            values = 1 + 0.1 * s
        elif tensor.dim() == 1:
            values = 0.05 * s
        else:
            s *= 0.35 * np.sqrt(3 / (tensor.shape[1] * tensor.shape[2] * tensor.shape[3]))
            values = s
        np.copyto(tensor.numpy().reshape(-1), values, casting="same_kind")
    for key in state:
        if key.endswith("num_batches_tracked"):
            state[key].zero_()
    return model


def deterministic_model(cls: type) -> nn.Module:
    """Width-1.0 model holding the recipe weights (built on meta: skips the costly random init)."""
    return fill_deterministic(build_on_meta(cls).to_empty(device="cpu")).eval()


@pytest.fixture(scope="module")
def reference():
    return dict(np.load(DATA / "network.npz"))


@pytest.fixture(scope="module")
def rrm_full():
    return deterministic_model(rrm.SegNet)


@pytest.fixture(scope="module")
def attention_full():
    return deterministic_model(rrm_attention.Net)


def assert_close_relative(actual: torch.Tensor, expected: np.ndarray, tolerance: float = 1e-4) -> None:
    assert tuple(actual.shape) == expected.shape
    error = np.abs(actual.detach().numpy() - expected).max() / np.abs(expected).max()
    assert error <= tolerance, f"max error {error:.3g} relative to max|x|"


def test_rrm_matches_released_outputs(rrm_full, reference):
    x = torch.from_numpy(reference["input"])
    with torch.no_grad():
        seg_infer = rrm_full(x, require_seg=True, require_mcam=False)
        logits, cam, seg = rrm_full(x)
    assert_close_relative(seg_infer, reference["rrm_seg_infer"])
    assert_close_relative(logits, reference["rrm_logits"])
    assert_close_relative(cam, reference["rrm_cam_4scale"])
    assert isinstance(seg, list) and len(seg) == 1
    assert_close_relative(seg[0], reference["rrm_seg"])


def test_attention_matches_released_outputs(attention_full, reference):
    x = torch.from_numpy(reference["input"])
    with torch.no_grad():
        logits, cam, seg, seg_feature = attention_full(x)
    assert_close_relative(logits, reference["att_logits"])
    assert_close_relative(cam, reference["att_cam"])
    assert_close_relative(seg, reference["att_seg"])
    assert_close_relative(seg_feature, reference["att_seg_feature"])


def test_full_width_shapes_at_odd_size(rrm_full, attention_full):
    x = torch.randn(1, 3, 97, 131)
    with torch.no_grad():
        taps = rrm_full.forward_as_dict(x)
        logits, cam, seg, seg_feature = attention_full(x)
    # 97 -> 49 -> 25 -> 13 and 131 -> 66 -> 33 -> 17 (three stride-2 convs, pad 1, kernel 3).
    assert {key: tuple(value.shape) for key, value in taps.items()} == {
        "conv4": (1, 512, 13, 17), "conv5": (1, 1024, 13, 17), "conv6": (1, 4096, 13, 17)}
    assert (logits.shape, cam.shape, seg.shape, seg_feature.shape) == (
        (1, 20), (1, 20, 13, 17), (1, 21, 13, 17), (1, 1024, 13, 17))


def test_full_width_seg_shape_at_crop_size(rrm_full):
    with torch.no_grad():
        seg = rrm_full.predict_seg(torch.randn(1, 3, 321, 321))
    assert seg.shape == (1, 21, 41, 41)


@pytest.mark.parametrize("batch", [1, 2])
def test_rrm_segnet_modes_and_shapes(batch):
    torch.manual_seed(0)
    model = rrm.SegNet(width=SMALL).train()
    x = torch.randn(batch, 3, 45, 61)
    logits, cam, seg = model(x)
    assert (logits.shape, cam.shape) == ((batch, 20), (batch, 20, 6, 8))
    assert isinstance(seg, list) and [s.shape for s in seg] == [(batch, 21, 6, 8)]
    assert model(x, require_seg=False, require_mcam=False).shape == (batch, 20)
    model.eval()
    with torch.no_grad():
        seg_only = model(x, require_seg=True, require_mcam=False)
        assert seg_only.shape == (batch, 21, 6, 8)
        assert torch.equal(model.predict_seg(x), seg_only)
        assert torch.allclose(seg_only, model(x)[2][0], atol=1e-6)


@pytest.mark.parametrize("batch", [1, 2])
def test_attention_segnet_modes_and_shapes(batch):
    torch.manual_seed(0)
    model = rrm_attention.SegNet(width=SMALL).train()
    x = torch.randn(batch, 3, 45, 61)
    logits, cam, seg, seg_feature = model(x)
    assert (logits.shape, cam.shape, seg.shape) == ((batch, 20), (batch, 20, 6, 8), (batch, 21, 6, 8))
    assert seg_feature.shape == (batch, 64, 6, 8)  # 512*w old + 2*256*w new = 1024*w
    assert model(x, require_seg=False, require_mcam=False).shape == (batch, 20)
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model.predict_seg(x), rrm_attention.Net.forward(model, x)[2], atol=1e-6)


def manual_four_scale_cam(single_scale_cam, x: torch.Tensor) -> torch.Tensor:
    """SPEC §3: CAMs at scales 1, 0.5, 1.5, 2 (size int(H*s)), resized to the scale-1 CAM, averaged."""
    cam1 = single_scale_cam(x)
    total = cam1.clone()
    for scale in (0.5, 1.5, 2.0):
        size = (int(x.shape[2] * scale), int(x.shape[3] * scale))
        cam = single_scale_cam(F.interpolate(x, size=size, mode="bilinear", align_corners=False))
        total += F.interpolate(cam, size=cam1.shape[2:], mode="bilinear", align_corners=False)
    return total / 4


def test_attention_segnet_four_scale_cam():
    torch.manual_seed(1)
    model = rrm_attention.SegNet(width=SMALL).eval()
    x = torch.randn(2, 3, 43, 59)
    with torch.no_grad():
        _, cam, seg, seg_feature = model(x)
        net_out = rrm_attention.Net.forward(model, x)
        expected = manual_four_scale_cam(
            lambda image: rrm_attention.Net.forward(model, image, require_cam=True, require_seg=False), x)
    assert torch.allclose(cam, expected, atol=1e-6)
    assert torch.equal(seg, net_out[2]) and torch.equal(seg_feature, net_out[3])


def test_extra_cam_scales_carry_no_gradient():
    torch.manual_seed(2)
    model = rrm.SegNet(width=SMALL).eval()
    x = torch.randn(1, 3, 41, 49)
    _, cam, _ = model(x)
    cam.sum().backward()
    multi_scale_grad = model.fc8.weight.grad.clone()
    model.zero_grad()
    (model(x, require_seg=False, require_mcam=True) / 4).sum().backward()
    assert torch.allclose(multi_scale_grad, model.fc8.weight.grad, rtol=1e-5, atol=1e-7)


def test_batchnorm_frozen_and_dropout_follows_mode():
    torch.manual_seed(3)
    model = rrm.SegNet(width=SMALL).train()
    batchnorms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    dropouts = [m for m in model.modules() if isinstance(m, nn.Dropout2d)]
    assert len(batchnorms) == 1 + sum(2 if kind == "basic" else 3 for _, kind, *_ in BACKBONE_BLOCKS)
    assert len(dropouts) == 5  # b6 and b7 (two each) and dropout7
    assert all(not m.training and not m.weight.requires_grad and not m.bias.requires_grad for m in batchnorms)
    assert all(m.training for m in dropouts)
    before = {key: value.clone() for key, value in model.state_dict().items() if "running" in key}
    x = torch.randn(2, 3, 33, 33)
    first = model(x, require_seg=False, require_mcam=False)
    second = model(x, require_seg=False, require_mcam=False)
    assert not torch.equal(first, second)  # dropout is active in training mode
    assert all(torch.equal(value, model.state_dict()[key]) for key, value in before.items())
    model.eval()
    assert all(not m.training for m in dropouts)
    assert torch.equal(model(x, require_seg=False, require_mcam=False),
                       model(x, require_seg=False, require_mcam=False))


@pytest.mark.parametrize("cls", [rrm.SegNet, rrm_attention.SegNet])
def test_batchnorm_training_option_learns_and_updates_statistics(cls):
    torch.manual_seed(5)
    model = cls(width=SMALL)
    model.set_batchnorm_training(True)
    model.train()
    batchnorms = {name: m for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)}
    assert all(m.training and m.weight.requires_grad and m.bias.requires_grad for m in batchnorms.values())
    bn_parameters = sorted(f"{name}.{kind}" for name in batchnorms for kind in ("weight", "bias"))
    groups = [names_of(model, group) for group in model.get_parameter_groups()]
    assert sorted(set(groups[1]) & set(bn_parameters)) == bn_parameters  # no decay, as biases
    assert not set(bn_parameters) & set(groups[0] + groups[2] + groups[3])
    outputs = []
    hook = batchnorms["bn7"].register_forward_hook(lambda module, inputs, output: outputs.append(output.clone()))
    model(torch.randn(2, 3, 33, 33), require_seg=False, require_mcam=False)
    hook.remove()
    # Batch statistics (weight 1, bias 0 at init): every channel of the output has mean 0, variance 1.
    assert outputs[0].mean(dim=(0, 2, 3)).abs().max() < 1e-4
    assert torch.allclose(outputs[0].var(dim=(0, 2, 3), unbiased=False), torch.ones(model.out_channels), rtol=1e-3)
    assert not torch.equal(batchnorms["bn7"].running_mean, torch.zeros_like(batchnorms["bn7"].running_mean))
    model.set_batchnorm_training(False)
    assert all(not m.training and not m.weight.requires_grad for m in batchnorms.values())
    assert not set(bn_parameters) & {n for group in model.get_parameter_groups() for n in names_of(model, group)}


def test_conv1a_trainable_in_rrm_but_frozen_in_backbone():
    assert rrm.SegNet(width=SMALL).train().conv1a.weight.requires_grad
    assert rrm_attention.SegNet(width=SMALL).train().conv1a.weight.requires_grad
    assert not resnet38d.Net(width=SMALL).train().conv1a.weight.requires_grad


def names_of(model: nn.Module, group: list) -> list[str]:
    name_by_id = {id(parameter): name for name, parameter in model.named_parameters()}
    return [name_by_id[id(parameter)] for parameter in group]


def test_parameter_groups():
    backbone_convs = sorted(key for key in expected_backbone_shapes() if "conv" in key)
    model = rrm.SegNet(width=SMALL).train()
    groups = [names_of(model, group) for group in model.get_parameter_groups()]
    assert sorted(groups[0]) == backbone_convs
    assert groups[1] == []
    assert sorted(groups[2]) == ["fc8.weight", "fc8_seg_conv1.weight", "fc8_seg_conv2.weight"]
    assert sorted(groups[3]) == ["fc8_seg_conv1.bias", "fc8_seg_conv2.bias"]

    model = rrm_attention.SegNet(width=SMALL).train()
    groups = [names_of(model, group) for group in model.get_parameter_groups()]
    assert sorted(groups[0]) == sorted(backbone_convs + [
        "GAU_w1.weight", "GAU_w2.weight", "GAU_w3.weight", "fc8_seg_conv1.weight",
        "fc8_seg_conv2.weight", "fc8_seg_conv3.weight", "fc8_seg_conv4.weight"])
    assert sorted(groups[1]) == ["fc8_seg_conv1.bias", "fc8_seg_conv2.bias"]
    assert groups[2] == ["fc8.weight"]
    assert groups[3] == []


def test_xavier_init_on_spec_layers_default_init_on_attention_layers():
    torch.manual_seed(4)
    model = rrm_attention.Net(width=0.25)
    for name in ("fc8", "fc8_seg_conv1", "fc8_seg_conv2"):
        weight = getattr(model, name).weight
        fan_in, fan_out = weight.shape[1] * weight[0, 0].numel(), weight.shape[0] * weight[0, 0].numel()
        bound = (6 / (fan_in + fan_out)) ** 0.5
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound, name
    for name in ("GAU_w1", "fc8_seg_conv3", "fc8_seg_conv4"):
        weight = getattr(model, name).weight
        bound = 1 / (weight.shape[1] * weight[0, 0].numel()) ** 0.5  # kaiming_uniform(a=sqrt 5)
        assert weight.abs().max() <= bound and weight.abs().max() > 0.9 * bound, name


@pytest.mark.parametrize("name, module, variant", [
    ("network.RRM", rrm, "rrm"), ("rrm", rrm, "rrm"),
    ("network.RRM(attention)", rrm_attention, "rrm_attention"), ("rrm_attention", rrm_attention, "rrm_attention"),
])
def test_registry_resolves_every_spelling(name, module, variant):
    assert network.resolve_network(name) is module
    model = network.build_segnet(name, width=SMALL)
    assert type(model) is module.SegNet and model.variant == variant == module.SegNet.variant


def test_registry_rejects_unknown_name():
    with pytest.raises(ValueError, match=r"unknown network 'network.PSA'.*'network.RRM'.*'rrm_attention'"):
        network.resolve_network("network.PSA")
