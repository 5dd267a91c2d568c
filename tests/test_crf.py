import numpy as np
import pytest

from tool.crf import dense_crf, dense_crf_same_image, inference_crf, training_crf


def _two_region_case(noise_pixel: bool = False):
    """Left half dark, right half bright; probs favour label 0 left, label 1 right."""
    image = np.zeros((20, 24, 3), np.uint8)
    image[:, 12:] = 200
    probs = np.empty((2, 20, 24), np.float32)
    probs[0] = np.where(np.arange(24) < 12, 0.7, 0.3)
    if noise_pixel:
        probs[0, 10, 5] = 0.4  # a lone wrong-ish pixel inside the dark half
    probs[1] = 1 - probs[0]
    return image, probs


def test_zero_iterations_return_normalised_clipped_probabilities():
    rng = np.random.default_rng(0)
    probs = rng.random((3, 7, 9)).astype(np.float32)
    probs[0, 0, 0] = 0.0  # clipped to 1e-5 by the unary -log(clip(p, 1e-5, 1))
    image = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    clipped = np.clip(probs, 1e-5, 1)
    expected = clipped / clipped.sum(0, keepdims=True)
    np.testing.assert_allclose(dense_crf(image, probs, iterations=0), expected, rtol=1e-4, atol=1e-7)


def test_marginals_shape_dtype_and_normalisation():
    image, probs = _two_region_case()
    marginals = training_crf(image, probs)
    assert marginals.shape == (2, 20, 24) and marginals.dtype == np.float32
    np.testing.assert_allclose(marginals.sum(0), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(marginals.argmax(0), probs.argmax(0))


def test_pairwise_terms_remove_an_isolated_wrong_pixel():
    image, probs = _two_region_case(noise_pixel=True)
    assert probs[:, 10, 5].argmax() == 1
    for crf in (training_crf, inference_crf):
        assert crf(image, probs)[:, 10, 5].argmax() == 0


def released_crf(image, probs, bilateral_sxy, bilateral_srgb, bilateral_compat):
    """The released call sequence, written from SPEC §5 / §10 with pydensecrf's own helpers:
    unary_from_softmax, Gaussian (sxy 3, compat 3) then bilateral pairwise, 10 iterations."""
    import pydensecrf.densecrf as dcrf
    from pydensecrf.utils import unary_from_softmax

    labels, height, width = probs.shape
    crf = dcrf.DenseCRF2D(width, height, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary_from_softmax(probs)))
    crf.addPairwiseGaussian(sxy=3, compat=3)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.copy(image), compat=bilateral_compat)
    return np.array(crf.inference(10)).reshape(labels, height, width)


def test_training_and_inference_crfs_are_the_released_calls():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (16, 18, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(4), size=(16, 18)).transpose(2, 0, 1).astype(np.float32)
    np.testing.assert_allclose(training_crf(image, probs), released_crf(image, probs, 80, 13, 10), rtol=0, atol=1e-6)
    np.testing.assert_allclose(inference_crf(image, probs), released_crf(image, probs, 83, 5, 4), rtol=0, atol=1e-6)
    assert not np.allclose(training_crf(image, probs), inference_crf(image, probs))


def test_shared_kernels_give_the_marginals_of_separate_runs():
    rng = np.random.default_rng(3)
    image = rng.integers(0, 256, (12, 15, 3), dtype=np.uint8)
    probs_list = [rng.dirichlet(np.ones(3), size=(12, 15)).transpose(2, 0, 1).astype(np.float32)
                  for _ in range(2)]
    shared = dense_crf_same_image(image, probs_list, bilateral_srgb=7)
    for probs, marginals in zip(probs_list, shared):
        np.testing.assert_array_equal(marginals, dense_crf(image, probs, bilateral_srgb=7))
    with pytest.raises(ValueError, match="one shape"):
        dense_crf_same_image(image, [probs_list[0], probs_list[0][:2]])


def test_non_contiguous_image_is_accepted():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (10, 12, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), size=(10, 12)).transpose(2, 0, 1).astype(np.float32)
    flipped = image[:, ::-1]
    assert not flipped.flags.c_contiguous
    np.testing.assert_array_equal(training_crf(flipped, probs), training_crf(flipped.copy(), probs))


def test_bad_inputs_raise_clear_errors():
    probs = np.full((2, 4, 5), 0.5, np.float32)
    with pytest.raises(ValueError, match="uint8"):
        dense_crf(np.zeros((4, 5, 3), np.float32), probs)
    with pytest.raises(ValueError, match=r"H x W x 3"):
        dense_crf(np.zeros((4, 5), np.uint8), probs)
    with pytest.raises(ValueError, match=r"K x H x W"):
        dense_crf(np.zeros((4, 6, 3), np.uint8), probs)
    with pytest.raises(ValueError, match="float"):
        dense_crf(np.zeros((4, 5, 3), np.uint8), probs.astype(np.int64))
