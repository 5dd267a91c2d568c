"""Batched torch reliable-region mining (tool/mining.py, SPEC §5) against the numpy reference."""
import os

import numpy as np
import pytest
import torch

from tool.crf import TRAINING_CRF_PARAMS, dense_crf_same_image
from tool.mining import (_class_thresholds, _class_thresholds_torch, _power, _power_float64,
                         mine_reliable_regions, mine_reliable_regions_torch, normalise_cam,
                         normalise_cams_torch)

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
MINING_CASES = ("two_blobs", "overlap", "one_class_large", "three")


def reference_crf(images: torch.Tensor, probs: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """The batch CRF interface on pydensecrf: each image's valid channels through
    `dense_crf_same_image` (both alphas, one kernel build), packed back with zero padding."""
    assert probs.ndim == 5 and probs.shape[1] == 2 and label_mask.dtype == torch.bool
    marginals = torch.zeros_like(probs)
    for index in range(probs.shape[0]):
        mask = label_mask[index].cpu().numpy()
        count = int(mask.sum())
        assert mask[:count].all() and not mask[count:].any(), "valid channels must be a prefix"
        if count == 1:  # a one-label CRF: marginal 1 everywhere
            marginals[index, :, 0] = 1
            continue
        image = np.ascontiguousarray(images[index].permute(1, 2, 0).cpu().numpy())
        pair = probs[index, :, :count].cpu().numpy()
        low, high = dense_crf_same_image(image, [pair[0], pair[1]], **TRAINING_CRF_PARAMS)
        marginals[index, 0, :count] = torch.from_numpy(low)
        marginals[index, 1, :count] = torch.from_numpy(high)
    return marginals.to(probs.device)


def _torch_batch(images_hwc, labels, norm_cams):
    images = torch.from_numpy(np.ascontiguousarray(np.stack(images_hwc).transpose(0, 3, 1, 2)))
    return images, torch.from_numpy(np.stack(labels)), torch.from_numpy(np.stack(norm_cams))


def _assert_matches_numpy(images_hwc, labels, norm_cams, **kwargs):
    mined = mine_reliable_regions_torch(*_torch_batch(images_hwc, labels, norm_cams), reference_crf,
                                        **kwargs)
    assert mined.dtype == torch.int64 and mined.shape == (len(labels),) + images_hwc[0].shape[:2]
    for index, (image, label, norm_cam) in enumerate(zip(images_hwc, labels, norm_cams)):
        np.testing.assert_array_equal(mined[index].numpy(), mine_reliable_regions(image, label, norm_cam),
                                      err_msg=f"image {index}")
    return mined


def _case(data, name):
    return data[f"{name}__image"], data[f"{name}__label"], data[f"{name}__norm_cam"]


def _random_case(rng, height, width, num_classes, raw=False):
    """Random image; CAMs = a few Gaussian bumps per class plus noise, normalised (or raw, with
    negative values and values above 1, to reach the max(., 0) and clipping paths)."""
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    label = np.zeros(20, np.float32)
    label[rng.choice(20, size=num_classes, replace=False)] = 1
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    cam = rng.random((20, height, width)).astype(np.float32) * 0.3
    for c in range(20):
        for _ in range(2):
            r, q, s = rng.random(3) * (height, width, max(height, width) / 3) + (0, 0, 2)
            cam[c] += np.exp(-((rows - r) ** 2 + (cols - q) ** 2) / (2 * s * s)).astype(np.float32)
    if raw:
        return image, label, (cam * 1.6 - 0.6).astype(np.float32)
    return image, label, normalise_cam(cam, label)


@pytest.mark.parametrize("case", MINING_CASES)
def test_each_released_case_equals_numpy_and_expected(case):
    data = np.load(os.path.join(DATA, "mining.npz"))
    image, label, norm_cam = _case(data, case)
    mined = _assert_matches_numpy([image], [label], [norm_cam])
    np.testing.assert_array_equal(mined[0].numpy(), data[f"{case}__expected"])


def test_mixed_batch_with_empty_and_many_class_images():
    data = np.load(os.path.join(DATA, "mining.npz"))
    cases = [_case(data, name) for name in MINING_CASES]
    empty = (cases[2][0], np.zeros(20, np.float32), cases[2][2])  # no present class, non-zero CAM
    many = _random_case(np.random.default_rng(7), 64, 80, 6)
    batch = [cases[3], empty, cases[0], many, cases[2], cases[1]]
    mined = _assert_matches_numpy(*zip(*batch))
    assert (mined[1] == 0).all()
    np.testing.assert_array_equal(mined[0].numpy(), data["three__expected"])
    np.testing.assert_array_equal(mined[5].numpy(), data["overlap__expected"])
    assert len(set(torch.unique(mined[3]).tolist()) - {0, 255}) >= 2


def test_random_cams_at_other_sizes_equal_numpy():
    rng = np.random.default_rng(11)
    # Different sizes per call; in each batch different label counts, incl. all 20 present (no
    # absent channel: the CAM bg does not clamp the max at 0) and raw CAMs with negatives.
    for height, width, counts, raw in ((33, 47, (1, 3, 20), False), (29, 1, (2, 1), False),
                                       (40, 36, (20, 4, 0, 2), True)):
        batch = [_random_case(rng, height, width, count, raw) for count in counts]
        _assert_matches_numpy(*zip(*batch))


def test_probs_and_label_mask_given_to_the_crf_are_the_numpy_ones():
    data = np.load(os.path.join(DATA, "mining.npz"))
    names = ("three", "one_class_large")
    seen = {}

    def recording_crf(images, probs, label_mask):
        seen.update(probs=probs.clone(), label_mask=label_mask.clone())
        return reference_crf(images, probs, label_mask)

    images, labels, norm_cams = _torch_batch(*zip(*[_case(data, name) for name in names]))
    mine_reliable_regions_torch(images, labels, norm_cams, recording_crf)
    assert seen["probs"].shape == (2, 2, 4, 64, 80) and seen["probs"].dtype == torch.float32
    np.testing.assert_array_equal(seen["label_mask"].numpy(), [[1, 1, 1, 1], [1, 1, 0, 0]])
    for index, name in enumerate(names):
        _, label, norm_cam = _case(data, name)
        present_cams = norm_cam[np.flatnonzero(label > 1e-5)]
        present_max = present_cams.max(axis=0, keepdims=True)
        for alpha_index, alpha in enumerate((4, 32)):
            expected = np.concatenate((np.power(1 - present_max, alpha), present_cams))
            got = seen["probs"][index, alpha_index].numpy()
            np.testing.assert_array_equal(got[:len(expected)], expected)
            assert not got[len(expected):].any()


def test_batch_without_any_present_class_skips_the_crf():
    def no_crf(*_):
        raise AssertionError("the CRF must not run")

    mined = mine_reliable_regions_torch(torch.zeros(2, 3, 5, 7, dtype=torch.uint8), np.zeros((2, 20)),
                                        torch.rand(2, 20, 5, 7), no_crf)
    assert mined.shape == (2, 5, 7) and mined.dtype == torch.int64 and not mined.any()


def test_normalise_cams_torch_is_bitwise_normalise_cam():
    rng = np.random.default_rng(5)
    cams = (rng.standard_normal((3, 20, 17, 23)) * 4).astype(np.float32)
    cams[0, 4] = -1.0  # an all-negative present map
    labels = (rng.random((3, 20)) < 0.3).astype(np.float32)
    labels[0, 4] = 1
    labels[1] = 0
    labels[2, 7] = np.float32(1e-5)  # equal to the float32 threshold: absent
    for dtype in (np.float32, np.float64):
        got = normalise_cams_torch(torch.from_numpy(cams.astype(dtype)), torch.from_numpy(labels))
        assert got.dtype == torch.from_numpy(cams.astype(dtype)).dtype
        expected = np.stack([normalise_cam(cam.astype(dtype), label) for cam, label in zip(cams, labels)])
        np.testing.assert_array_equal(got.numpy(), expected)
    # labels as numpy, float32 cams
    expected = np.stack([normalise_cam(cam, label) for cam, label in zip(cams, labels)])
    np.testing.assert_array_equal(normalise_cams_torch(torch.from_numpy(cams), labels).numpy(), expected)


def test_class_thresholds_equal_numpy_with_ties_and_boundaries():
    rng = np.random.default_rng(9)
    grid = np.float32([0.05, 0.1, np.nextafter(np.float32(0.1), np.float32(1)), 0.3, 0.5, 0.8, 0.9, 1.0])
    channel = rng.integers(0, 4, (3, 500))
    cam_value = rng.choice(grid, (3, 500)).astype(np.float32)
    cam_value[:, :200] = rng.random((3, 200)).astype(np.float32)
    channel[1][channel[1] == 2] = 1  # image 1: channel 2 has no pixel
    channel[2][cam_value[2] > 0.1] = 0  # image 2: no class pixel above the floor
    in_la_map = np.array([[1, 1, 1, 1], [1, 1, 1, 0], [0, 1, 1, 1]], bool)
    got = _class_thresholds_torch(torch.from_numpy(channel), torch.from_numpy(cam_value),
                                  torch.from_numpy(in_la_map)).numpy()
    assert got.dtype == np.float32
    for index in range(3):
        # numpy's thresholds indexed by label == channel here (channel_label = identity).
        expected = _class_thresholds(np.flatnonzero(in_la_map[index]), channel[index], cam_value[index])
        np.testing.assert_array_equal(got[index], expected[:4])
    assert got[1, 2] == np.inf and got[2, 0] == np.inf and (got[2, 1:] == np.inf).all()


def test_bg_power_numpy_mode_is_exact_and_float64_mode_within_one_ulp():
    # Every float32 value 1 - m for m in [0, 1] is k / 2^24: check them all.
    base = torch.arange(2 ** 24 + 1, dtype=torch.float64).mul_(2.0 ** -24).float()
    for exponent in (4, 32):
        numpy_power = np.power(base.numpy(), exponent)
        np.testing.assert_array_equal(_power(base, exponent, "auto").numpy(), numpy_power)
        squared = _power_float64(base, exponent)
        correctly_rounded = np.power(base.numpy().astype(np.float64), exponent).astype(np.float32)
        np.testing.assert_array_equal(squared.numpy(), correctly_rounded)
        ulps = np.abs(squared.numpy().view(np.int32).astype(np.int64) - numpy_power.view(np.int32))
        assert ulps.max() <= 1


def test_bad_inputs_name_the_argument():
    images = torch.zeros(2, 3, 4, 5, dtype=torch.uint8)
    labels = torch.ones(2, 20)
    cams = torch.zeros(2, 20, 4, 5)
    with pytest.raises(ValueError, match="images"):
        mine_reliable_regions_torch(images.float(), labels, cams, reference_crf)
    with pytest.raises(ValueError, match="images"):
        mine_reliable_regions_torch(images[:, :2], labels, cams, reference_crf)
    with pytest.raises(ValueError, match="norm_cams"):
        mine_reliable_regions_torch(images, labels, cams[:, :, :3], reference_crf)
    with pytest.raises(ValueError, match="norm_cams must be float32"):
        mine_reliable_regions_torch(images, labels, cams.double(), reference_crf)
    with pytest.raises(ValueError, match="labels"):
        mine_reliable_regions_torch(images, labels[:1], cams, reference_crf)
    with pytest.raises(ValueError, match="labels"):
        mine_reliable_regions_torch(images, labels[:, :19], cams, reference_crf)
    with pytest.raises(ValueError, match="crf must be callable"):
        mine_reliable_regions_torch(images, labels, cams, None)
    with pytest.raises(ValueError, match="crf must return"):
        mine_reliable_regions_torch(images, labels, cams, lambda i, p, m: p[:, :1])
    with pytest.raises(ValueError, match="power"):
        mine_reliable_regions_torch(images, labels, cams, reference_crf, power="exact")
    with pytest.raises(ValueError, match="cams"):
        normalise_cams_torch(torch.zeros(2, 21, 4, 4), labels)
    with pytest.raises(ValueError, match="labels"):
        normalise_cams_torch(cams, torch.ones(3, 20))


def _identity_crf(images, probs, label_mask):
    """A device-side stand-in CRF: the marginals are the probs (exact on every device)."""
    return torch.where(label_mask[:, None, :, None, None], probs, torch.zeros((), device=probs.device))


@pytest.mark.cuda
def test_cuda_mining_runs_without_sync_and_equals_cpu():
    data = np.load(os.path.join(DATA, "mining.npz"))
    rng = np.random.default_rng(13)
    batch = [_case(data, name) for name in MINING_CASES]
    batch.insert(1, (batch[0][0], np.zeros(20, np.float32), batch[0][2]))
    batch.append(_random_case(rng, 64, 80, 7))
    images, labels, norm_cams = _torch_batch(*zip(*batch))
    raw = torch.from_numpy(np.stack([_random_case(rng, 64, 80, 20)[2] for _ in batch])) * 3
    device = torch.device("cuda")
    images_gpu, raw_gpu, cams_gpu = (t.to(device) for t in (images, raw, norm_cams))
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with pytest.raises(RuntimeError):  # the mode is active: a sync is refused
            torch.ones(1, device=device).item()
        normalised_gpu = normalise_cams_torch(raw_gpu, labels)
        mined_gpu = mine_reliable_regions_torch(images_gpu, labels, cams_gpu, _identity_crf)
        mined_raw_gpu = mine_reliable_regions_torch(images_gpu, labels, normalised_gpu, _identity_crf)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert mined_gpu.device.type == "cuda"
    np.testing.assert_array_equal(normalised_gpu.cpu().numpy(), normalise_cams_torch(raw, labels).numpy())
    cpu = mine_reliable_regions_torch(images, labels, norm_cams, _identity_crf, power="float64")
    cpu_raw = mine_reliable_regions_torch(images, labels, normalise_cams_torch(raw, labels),
                                          _identity_crf, power="float64")
    np.testing.assert_array_equal(mined_gpu.cpu().numpy(), cpu.numpy())
    np.testing.assert_array_equal(mined_raw_gpu.cpu().numpy(), cpu_raw.numpy())
    assert (cpu[1] == 0).all()
    for result in (cpu, cpu_raw):
        assert len(set(torch.unique(result).tolist())) >= 4  # bg, ignore and classes: not vacuous
