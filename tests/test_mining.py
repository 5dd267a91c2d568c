import os

import numpy as np
import pytest

from tool.crf import training_crf
from tool.mining import ReliableRegionMiner, _class_thresholds, mine_reliable_regions, normalise_cam

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")

MINING_CASES = ("two_blobs", "overlap", "one_class_large", "three")


def _square_blobs(height: int, width: int, blobs: list[tuple[int, tuple[int, int], tuple[int, int, int]]]):
    """Flat grey image with coloured squares (Chebyshev radius 8) and CAMs 1 - r/12 around them."""
    image = np.full((height, width, 3), 120, np.uint8)
    rows, cols = np.mgrid[:height, :width]
    norm_cam = np.zeros((20, height, width), np.float32)
    label = np.zeros(20, np.float32)
    radii = []
    for class_index, (centre_row, centre_col), colour in blobs:
        radius = np.maximum(abs(rows - centre_row), abs(cols - centre_col))
        image[radius <= 8] = colour
        norm_cam[class_index] = np.clip(1 - radius / 12, 0, 1)
        label[class_index] = 1
        radii.append(radius)
    return image, label, norm_cam, radii, cols


def loop_reference_mining(image: np.ndarray, label: np.ndarray, norm_cam: np.ndarray) -> np.ndarray:
    """SPEC §5 transcribed step by step with per-class loops (released code, crash fixed)."""
    present = [c for c in range(20) if label[c] > 1e-5]
    cam_np = np.zeros_like(norm_cam)
    for c in present:
        cam_np[c] = norm_cam[c]
    cam_all = np.concatenate((np.power(1 - np.max(cam_np, 0), 32)[None], cam_np))
    cam_img = np.argmax(cam_all, 0)
    crfs = []
    for alpha in (4, 32):
        values = np.array([norm_cam[c] for c in present])
        probs = np.concatenate((np.power(1 - np.max(values, 0, keepdims=True), alpha), values))
        marginals = training_crf(image, probs)
        full = np.zeros((21,) + image.shape[:2])
        full[0] = marginals[0]
        for i, c in enumerate(present):
            full[c + 1] = marginals[i + 1]
        crfs.append(full)
    crf_la, crf_ha = crfs
    crf_la_label, crf_ha_label = np.argmax(crf_la, 0), np.argmax(crf_ha, 0)
    result = crf_la_label.copy()
    result[crf_la_label == 0] = 255
    cam_sure = np.zeros(image.shape[:2], bool)
    for c in np.unique(crf_la_label):
        restricted = cam_all[c].copy()
        restricted[cam_img != c] = 0
        if c == 0:
            cam_sure |= restricted > 0.8
            continue
        ordered = np.sort(restricted[restricted > 0.1])
        if ordered.size:
            cam_sure |= restricted > ordered[int(ordered.size * 0.6)]
    result[crf_ha_label == 0] = 0
    crf_confidence = np.max(np.concatenate((crf_ha[:1], crf_la[1:])), 0)
    result[~cam_sure | (crf_confidence < 0.8)] = 255
    return result


@pytest.mark.parametrize("case", MINING_CASES)
def test_matches_released_code_vectors(case):
    data = np.load(os.path.join(DATA, "mining.npz"))
    mined = mine_reliable_regions(data[f"{case}__image"], data[f"{case}__label"], data[f"{case}__norm_cam"])
    np.testing.assert_array_equal(mined, data[f"{case}__expected"])


def test_two_separated_blobs_cores_labelled_borders_ignored_background_zero():
    image, label, norm_cam, (radius_a, radius_b), _ = _square_blobs(
        48, 64, [(2, (16, 16), (220, 30, 30)), (11, (30, 46), (30, 30, 220))])
    mined = mine_reliable_regions(image, label, norm_cam)
    # CAM values > 0.1 lie at radius <= 10 (441 pixels); sorted index int(0.6*441) = 264 falls on
    # ring 7, so exactly the rings 0..6 are above the threshold. Background is sure once cam = 0.
    expected = np.full(mined.shape, 255)
    expected[np.minimum(radius_a, radius_b) >= 12] = 0
    expected[radius_a <= 6] = 3
    expected[radius_b <= 6] = 12
    np.testing.assert_array_equal(mined, expected)


def test_overlapping_classes_split_at_the_cam_tie():
    image, label, norm_cam, (radius_a, radius_b), cols = _square_blobs(
        40, 64, [(4, (20, 24), (220, 30, 30)), (7, (20, 40), (30, 30, 220))])
    mined = mine_reliable_regions(image, label, norm_cam)
    assert set(np.unique(mined)) == {0, 5, 8, 255}
    assert mined[20, 24] == 5 and mined[20, 40] == 8
    assert (cols[mined == 5] < 32).all() and (cols[mined == 8] > 32).all()
    contested = (cols == 32) & (radius_a <= 10)  # equal CAMs of both classes: neither is sure
    assert (mined[contested] == 255).all()
    assert (mined[np.minimum(radius_a, radius_b) >= 12] == 0).all()


def test_vectorised_mining_equals_per_class_loop_on_random_cams():
    rng = np.random.default_rng(3)
    for trial in range(3):
        image = rng.integers(0, 256, (20, 28, 3), dtype=np.uint8)
        label = np.zeros(20, np.float32)
        label[rng.choice(20, size=trial + 1, replace=False)] = 1
        norm_cam = normalise_cam(rng.random((20, 20, 28)).astype(np.float32) ** 2, label)
        np.testing.assert_array_equal(mine_reliable_regions(image, label, norm_cam),
                                      loop_reference_mining(image, label, norm_cam))


def test_labels_are_present_classes_background_or_ignore():
    rng = np.random.default_rng(0)
    for _ in range(4):
        label = (rng.random(20) < 0.15).astype(np.float32)
        norm_cam = normalise_cam(rng.random((20, 24, 30)).astype(np.float32), label)
        mined = mine_reliable_regions(rng.integers(0, 256, (24, 30, 3), dtype=np.uint8), label, norm_cam)
        allowed = {0, 255} | {int(c) + 1 for c in np.flatnonzero(label)}
        assert set(np.unique(mined).tolist()) <= allowed


def test_class_threshold_without_cam_value_above_floor_is_never_reached():
    # The released code indexes an empty sorted array here; a CRF-labelled class whose CAM region
    # holds no value > 0.1 must simply have no sure pixel.
    cam_img = np.array([[0, 3, 3], [10, 10, 3]])
    cam_value = np.array([[0.9, 0.5, 0.2], [0.05, 0.1, 0.3]], np.float32)
    thresholds = _class_thresholds(np.array([0, 3, 10]), cam_img, cam_value)
    assert thresholds.dtype == np.float32
    assert thresholds[0] == np.float32(0.8)
    assert thresholds[3] == np.float32(0.3)  # sorted [0.2, 0.3, 0.5], position int(0.6 * 3) = 1
    assert thresholds[10] == np.inf and thresholds[5] == np.inf


def test_present_class_with_weak_cam_is_not_labelled():
    image, label, norm_cam, _, _ = _square_blobs(32, 32, [(5, (16, 16), (200, 200, 40))])
    label[9] = 1
    norm_cam[9] = 0.05  # present but never above 0.1
    mined = mine_reliable_regions(image, label, norm_cam)
    assert 10 not in mined
    assert mined[16, 16] == 6


def test_empty_label_vector_gives_all_background():
    image = np.random.default_rng(1).integers(0, 256, (12, 9, 3), dtype=np.uint8)
    mined = mine_reliable_regions(image, np.zeros(20, np.float32), np.ones((20, 12, 9), np.float32))
    np.testing.assert_array_equal(mined, np.zeros((12, 9)))


def test_class_covering_everything_is_nowhere_sure():
    label = np.zeros(20, np.float32)
    label[0] = 1
    norm_cam = np.zeros((20, 16, 20), np.float32)
    norm_cam[0] = 1.0  # threshold = the common value 1.0, and nothing is strictly above it
    mined = mine_reliable_regions(np.full((16, 20, 3), 90, np.uint8), label, norm_cam)
    np.testing.assert_array_equal(mined, np.full((16, 20), 255))


def test_one_pixel_wide_image():
    rng = np.random.default_rng(2)
    label = np.zeros(20, np.float32)
    label[[3, 17]] = 1
    norm_cam = normalise_cam(rng.random((20, 30, 1)).astype(np.float32), label)
    image = rng.integers(0, 256, (30, 1, 3), dtype=np.uint8)
    mined = mine_reliable_regions(image, label, norm_cam)
    assert mined.shape == (30, 1)
    np.testing.assert_array_equal(mined, loop_reference_mining(image, label, norm_cam))


def test_normalise_cam_zeroes_absent_classes_and_divides_by_max():
    cam = np.random.default_rng(4).random((20, 5, 6)).astype(np.float32) * 3
    label = np.zeros(20, np.float32)
    label[[1, 8]] = 1
    normalised = normalise_cam(cam, label)
    assert normalised.dtype == np.float32
    np.testing.assert_allclose(normalised[8], cam[8] / (cam[8].max() + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(normalised[1].max(), cam[1].max() / (cam[1].max() + 1e-5), rtol=1e-6)
    assert not normalised[[c for c in range(20) if c not in (1, 8)]].any()


def test_bad_inputs_name_the_problem():
    label = np.zeros(20, np.float32)
    with pytest.raises(ValueError, match="uint8"):
        mine_reliable_regions(np.zeros((4, 4, 3), np.float32), label, np.zeros((20, 4, 4), np.float32))
    with pytest.raises(ValueError, match="norm_cam"):
        mine_reliable_regions(np.zeros((4, 4, 3), np.uint8), label, np.zeros((20, 4, 5), np.float32))
    with pytest.raises(ValueError, match="label"):
        normalise_cam(np.zeros((20, 4, 4)), np.zeros(21))
    with pytest.raises(ValueError, match="mining_workers"):
        ReliableRegionMiner(workers=-1)


def test_worker_pool_equals_serial_and_closes():
    data = np.load(os.path.join(DATA, "mining.npz"))
    images = np.stack([data[f"{c}__image"] for c in MINING_CASES])
    labels = np.stack([data[f"{c}__label"] for c in MINING_CASES])
    labels[1] = 0  # an empty label vector in the batch too
    norm_cams = np.stack([data[f"{c}__norm_cam"] for c in MINING_CASES])
    serial = ReliableRegionMiner(workers=0)(images, labels, norm_cams)
    environment_before = {name: os.environ.get(name) for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    with ReliableRegionMiner() as miner:
        assert miner.workers == os.cpu_count()
        # Giving the workers one native thread each leaves the parent's environment as it was.
        assert {name: os.environ.get(name) for name in environment_before} == environment_before
        pooled = miner(images, labels, norm_cams)
        pooled_again = miner(images[:1], labels[:1], norm_cams[:1])
    np.testing.assert_array_equal(pooled, serial)
    np.testing.assert_array_equal(pooled_again, serial[:1])
    np.testing.assert_array_equal(serial[0], data["two_blobs__expected"])
    with pytest.raises(RuntimeError, match="closed"):
        miner(images, labels, norm_cams)
