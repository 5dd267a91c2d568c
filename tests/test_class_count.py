"""The class count comes from the data: COCO's 80 classes (81 labels) through networks, mining, losses, filters.

The references are the VOC paths, checked against the released code elsewhere: what depends only on
the present classes (mining, BCD) must give a COCO result that is the VOC result relabelled.
"""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import bilateralfilter
from network import build_segnet
from tool.bilateral import bilateral_filter
from tool.crf_torch import training_crf_torch
from tool.lattice import bilateral_filter_torch
from tool.losses import bcd_loss
from tool.mining import (ReliableRegionMiner, mine_pseudo_labels, mine_reliable_regions, mine_reliable_regions_torch,
                         normalise_cam)

pytestmark = pytest.mark.usefixtures("one_thread")
COCO_PRESENT = [2, 40, 79]  # three of COCO's 80 classes ...
VOC_PRESENT = [2, 10, 19]  # ... and three of VOC's 20 in the same ascending order


def blob_case(seed, num_classes, present, height=40, width=48):
    """An image with three coloured blobs, the CAM peaking on them (random noise on the absent classes,
    which normalisation must zero), and the label."""
    rng = np.random.default_rng(seed)
    rows, cols = np.mgrid[:height, :width].astype(np.float32)
    image = rng.normal(110, 15, (height, width, 3))
    cam = rng.random((num_classes, height, width)).astype(np.float32)
    label = np.zeros(num_classes, np.float32)
    for k, class_index in enumerate(present):
        centre = (10 + 10 * k, 12 + 12 * k)
        distance = np.hypot((rows - centre[0]) / 9, (cols - centre[1]) / 11)
        image[distance < 1] = (60 + 60 * k, 200 - 50 * k, 90)
        cam[class_index] = np.exp(-distance ** 2).astype(np.float32) * (1 + k)
        label[class_index] = 1
    return np.clip(image, 0, 255).astype(np.uint8), label, cam


def voc_labels_of(coco_mined):
    lookup = np.arange(256)
    lookup[[c + 1 for c in COCO_PRESENT]] = [c + 1 for c in VOC_PRESENT]
    return lookup[coco_mined]


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
def test_mining_80_classes_is_the_voc_result_relabelled(backend):
    for seed in range(2):
        image, coco_label, coco_cam = blob_case(seed, 80, COCO_PRESENT)
        _, voc_label, voc_cam = blob_case(seed, 20, VOC_PRESENT)
        voc_cam = voc_cam.copy()
        voc_cam[VOC_PRESENT] = coco_cam[COCO_PRESENT]
        coco = mine_reliable_regions(image, coco_label, normalise_cam(coco_cam, coco_label), backend)
        voc = mine_reliable_regions(image, voc_label, normalise_cam(voc_cam, voc_label), backend)
        assert len(np.unique(voc)) >= 3  # background, ignore and classes
        np.testing.assert_array_equal(voc_labels_of(coco), voc)


def test_the_mining_pool_and_the_torch_backend_take_80_classes():
    cases = [blob_case(seed, 80, COCO_PRESENT) for seed in range(2)]
    images = np.stack([case[0] for case in cases])
    labels = np.stack([case[1] for case in cases])
    norm_cams = np.stack([normalise_cam(case[2], case[1]) for case in cases])
    serial = ReliableRegionMiner(0)(images, labels, norm_cams)
    with ReliableRegionMiner(1) as pool:
        np.testing.assert_array_equal(pool(images, labels, norm_cams), serial)
    mined = mine_reliable_regions_torch(torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels,
                                        torch.from_numpy(norm_cams), training_crf_torch)
    assert (mined.numpy() == serial).mean() >= 0.999


@pytest.mark.parametrize("num_classes", [20, 80])
def test_engine_normalises_only_the_present_classes_with_the_batch_numbers(num_classes):
    rng = np.random.default_rng(3)
    cam = torch.from_numpy(rng.random((2, num_classes, 6, 7), dtype=np.float32) * 2)
    labels = torch.zeros(2, num_classes)
    labels[0, [3, num_classes // 2]] = 1
    labels[1, num_classes - 3] = 1
    originals = torch.from_numpy(rng.integers(0, 256, (2, 3, 48, 56), dtype=np.uint8))
    full = F.interpolate(cam, size=(48, 56), mode="bilinear", align_corners=False).numpy()
    expected = np.stack([normalise_cam(full[i], labels[i].numpy()) for i in range(2)])
    seen = {}

    def miner(images, labels_np, norm_cams):
        seen.update(labels=labels_np, norm_cams=norm_cams)
        return np.zeros(images.shape[:3], np.int64)

    mine_pseudo_labels(cam, labels, originals, miner)
    np.testing.assert_array_equal(seen["norm_cams"], expected)  # bit for bit with the whole batch's, all channels
    np.testing.assert_array_equal(seen["labels"], labels.numpy())
    torch_path = mine_pseudo_labels(cam, labels, originals, None)
    reference = mine_reliable_regions_torch(originals, labels, torch.from_numpy(expected), training_crf_torch)
    torch.testing.assert_close(torch_path, reference, rtol=0, atol=0)
    # A batch without any class: everything background, nothing upsampled.
    empty = mine_pseudo_labels(cam, torch.zeros(2, num_classes), originals, ReliableRegionMiner(0))
    assert empty.shape == (2, 48, 56) and not empty.any()


@pytest.mark.parametrize("name", ["network.RRM", "network.RRM(attention)"])
def test_networks_have_the_class_count_of_the_data_set(name):
    torch.manual_seed(0)
    coco = build_segnet(name, 0.0625, num_classes=80)
    voc = build_segnet(name, 0.0625)
    assert coco.num_classes == 80 and voc.num_classes == 20
    assert list(coco.state_dict()) == list(voc.state_dict())  # the released names, other head sizes
    outputs = coco(torch.randn(2, 3, 48, 48))
    assert outputs[0].shape == (2, 80) and outputs[1].shape == (2, 80, 6, 6)
    seg = outputs[2][0] if isinstance(outputs[2], list) else outputs[2]
    assert seg.shape == (2, 81, 6, 6)
    assert coco.eval().predict_seg(torch.randn(1, 3, 40, 32)).shape == (1, 81, 5, 4)
    with pytest.raises(ValueError, match="num_classes must be a positive int, got 0"):
        build_segnet(name, 0.0625, num_classes=0)


def test_bcd_over_81_labels_is_the_bcd_of_the_relabelled_21():
    generator = torch.Generator().manual_seed(4)
    voc_classes = torch.tensor([0, 3, 12, 20])
    classes = torch.randint(0, 4, (2, 5, 6), generator=generator)
    classes[0, 0, 0], classes[1, 0, 0] = 0, 3  # every centre kind present
    features = torch.randn(2, 16, 5, 6, generator=generator, dtype=torch.float64)

    def seg_of(pixel_classes, num_labels):
        scores = torch.rand((2, num_labels, 5, 6), generator=generator, dtype=torch.float64)
        return scores + 5 * F.one_hot(pixel_classes, num_labels).permute(0, 3, 1, 2)
    coco = bcd_loss(seg_of(torch.tensor([0, 5, 47, 80])[classes], 81), features)
    voc = bcd_loss(seg_of(voc_classes[classes], 21), features)
    torch.testing.assert_close(coco, voc, rtol=1e-12, atol=0)


def test_the_dense_energy_filters_push_81_channels_in_one_pass():
    rng = np.random.default_rng(5)
    images = rng.uniform(0, 255, (1, 3, 14, 17)).astype(np.float32)
    values = rng.dirichlet(np.ones(81), size=(14, 17)).transpose(2, 0, 1)[None].astype(np.float32)
    together = bilateral_filter(images, values, 15.0, 8.0)
    for k in (0, 33, 80):
        alone = np.zeros(14 * 17, np.float32)
        bilateralfilter.bilateralfilter(images[0].ravel(), values[0, k].ravel(), alone, 14, 17, 15.0, 8.0)
        np.testing.assert_array_equal(together[0, k], alone.reshape(14, 17))
    on_torch = bilateral_filter_torch(torch.from_numpy(images), torch.from_numpy(values), 15.0, 8.0)
    np.testing.assert_allclose(on_torch.numpy(), together, rtol=1e-4, atol=1e-4)
