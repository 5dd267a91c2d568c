"""What must stay float32 under autocast: the CAMs that reach mining and the attention softmax."""
import pytest
import torch

from network import rrm, rrm_attention, resnet38d

WIDTH = 0.0625


def model(module, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return module.SegNet(WIDTH).eval()


@pytest.mark.parametrize("module", [rrm, rrm_attention])
def test_cam_of_the_same_features_is_float32_and_unchanged_under_autocast(module):
    net = model(module)
    features = resnet38d.Net.forward(net, torch.randn(2, 3, 33, 41))
    plain = net.cam(features)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast = net.cam(features)
        cast_input = net.cam(features.bfloat16())  # what autocast hands over from a bf16 backbone
    assert cast.dtype == torch.float32 and cast_input.dtype == torch.float32
    assert (cast - plain).abs().max() <= 1e-6
    # A bf16 conv here would differ by ~1e-2 of the range; the bf16 input itself only by its rounding.
    assert (cast_input - net.cam(features.bfloat16().float())).abs().max() <= 1e-6


@pytest.mark.parametrize("module", [rrm, rrm_attention])
def test_four_scale_cam_reaching_mining_is_float32_under_autocast(module):
    net = model(module)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = net(torch.randn(1, 3, 41, 57), require_seg=True, require_mcam=True)
    assert outputs[1].dtype == torch.float32


def test_attention_softmax_does_not_overflow_in_fp16():
    net = model(rrm_attention)
    features = torch.rand(1, net.out_channels, 6, 7) * 40.0
    with torch.no_grad():
        for layer in (net.GAU_w1, net.GAU_w2):
            layer.weight.fill_(0.05)  # query·key ≈ (0.05·40·C/2)² · C_gau ≫ 65504, the fp16 maximum
        with torch.autocast("cpu", dtype=torch.float16):
            query = net.GAU_w1(features).flatten(2).transpose(1, 2)
            assert torch.isinf(torch.bmm(query, net.GAU_w2(features).flatten(2))).any()  # the hazard is real
            seg, seg_feature = net.segment_with_features(features)
    assert torch.isfinite(seg).all() and torch.isfinite(seg_feature).all()
