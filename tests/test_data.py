import os
import shutil

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.transforms import ColorJitter

from tool.train_batches import PositionSeededDataset, StepBatchSampler
from voc12.data import (
    IMAGENET_MEAN, IMAGENET_STD, EvalDataset, TrainDatasetInit, TrainDatasetScaled, load_cls_labels, read_id_list,
)
from voc12.synthetic import generate_dataset

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("voc")
    generate_dataset(path, num_train=10, num_val=4, seed=2, size_min=64, size_max=96)
    return str(path)


@pytest.fixture
def copy_root(root, tmp_path):
    return shutil.copytree(root, tmp_path / "voc")


def raw(root, image_id):
    return np.array(Image.open(os.path.join(root, "JPEGImages", image_id + ".jpg")).convert("RGB"))


def roi_box(roi):
    rows, cols = np.flatnonzero(roi.any(1)), np.flatnonzero(roi.any(0))
    return rows[0], rows[-1] + 1, cols[0], cols[-1] + 1


def test_init_dataset_reproduces_flip_jitter_normalise_crop(root):
    dataset = TrainDatasetInit(root, crop_size=112, seed=7)
    labels = load_cls_labels(os.path.join(root, "cls_labels.npy"))
    for index in range(3):
        item = dataset[index]
        assert set(item) == {"id", "image", "original", "roi", "label"}
        assert item["image"].shape == (3, 112, 112) and item["image"].dtype == np.float32
        assert item["original"].shape == (3, 112, 112) and item["original"].dtype == np.uint8
        assert item["roi"].shape == (112, 112) and item["roi"].dtype == np.float32
        np.testing.assert_array_equal(item["label"], labels[item["id"]])
    # independent re-computation of the released chain with the same random stream
    rng = np.random.default_rng(7)
    dataset = TrainDatasetInit(root, crop_size=112, seed=7)
    for index in range(3):
        image = Image.open(os.path.join(root, "JPEGImages", dataset.ids[index] + ".jpg")).convert("RGB")
        if rng.random() < 0.5:
            image = image.transpose(Image.FLIP_LEFT_RIGHT)
        torch.manual_seed(int(rng.integers(2**63)))
        jittered = np.asarray(ColorJitter(0.3, 0.3, 0.3, 0.1)(image))
        height, width = jittered.shape[:2]
        top, left = int(rng.integers(112 - height + 1)), int(rng.integers(112 - width + 1))
        item = dataset[index]
        assert roi_box(item["roi"]) == (top, top + height, left, left + width)
        assert item["roi"].sum() == height * width
        original = item["original"].transpose(1, 2, 0)
        np.testing.assert_array_equal(original[top:top + height, left:left + width], jittered)
        assert not original[item["roi"] == 0].any()  # black padding
        expected = (jittered / 255.0 - MEAN) / STD
        np.testing.assert_allclose(item["image"].transpose(1, 2, 0)[top:top + height, left:left + width], expected, atol=1e-5)
        assert not item["image"][:, item["roi"] == 0].any()


def test_init_dataset_crop_smaller_than_image_and_random_resize_flag(root):
    item = TrainDatasetInit(root, crop_size=48, seed=0)[0]
    assert item["roi"].all() and item["original"].shape == (3, 48, 48)
    height, width = raw(root, "train_000000").shape[:2]
    default = TrainDatasetInit(root, crop_size=200, seed=0)[0]
    assert roi_box(default["roi"])[1] - roi_box(default["roi"])[0] == height  # released: resize not applied
    resized = TrainDatasetInit(root, crop_size=200, seed=0, apply_random_resize=True, resize_long=(150, 150))[0]
    top, bottom, left, right = roi_box(resized["roi"])
    assert max(bottom - top, right - left) == 150
    assert min(bottom - top, right - left) == round(min(height, width) * 150 / max(height, width))


def test_scaled_dataset_at_scale_one_recovers_the_image(root):
    dataset = TrainDatasetScaled(root, crop_size=112, seed=3)
    for index in range(4):
        item = dataset[(index, 1.0)]
        image = raw(root, dataset.ids[index])
        top, bottom, left, right = roi_box(item["roi"])
        assert (bottom - top, right - left) == image.shape[:2]
        original = item["original"].transpose(1, 2, 0)
        window = original[top:bottom, left:right]
        # released truncation: float round-off can only lose one level
        def off_by_at_most_one(reference):
            difference = reference.astype(int) - window.astype(int)
            return bool(((difference >= 0) & (difference <= 1)).all())
        assert off_by_at_most_one(image) or off_by_at_most_one(image[:, ::-1])
        # padding of the original = de-normalised 0 = the mean colour, truncated: (123, 116, 103)
        assert (original[item["roi"] == 0] == np.array([123, 116, 103])).all()
        assert not item["image"][:, item["roi"] == 0].any()


def test_scaled_dataset_uses_opencv_bilinear_resize(root):
    dataset = TrainDatasetScaled(root, crop_size=160, seed=4)
    image = raw(root, dataset.ids[1]).astype(np.float32)
    height, width = image.shape[:2]
    item = dataset[(1, 0.77)]
    top, bottom, left, right = roi_box(item["roi"])
    assert (bottom - top, right - left) == (int(height * 0.77), int(width * 0.77))
    resized = cv2.resize(image, (int(width * 0.77), int(height * 0.77)), interpolation=cv2.INTER_LINEAR)
    window = item["image"].transpose(1, 2, 0)[top:bottom, left:right]
    errors = [np.abs(window - (candidate / 255.0 - MEAN) / STD).max() for candidate in (resized, resized[:, ::-1])]
    assert min(errors) < 1e-4
    # a large scale crops a window: the ROI is full
    assert dataset[(1, 3.0)]["roi"].all()
    # a plain index draws its own scale in the range
    top, bottom, _, _ = roi_box(dataset[1]["roi"])
    assert int(height * 0.7) <= bottom - top <= int(height * 1.3)


def _scale_interval(length, extent):
    # scales s with int(length * s) == extent
    return extent / length, (extent + 1) / length


def step_batches(dataset, batch_size, seed, workers, *, order="stream", scaled=False, steps=3):
    """The training engine's batches: items seeded by their position, one scale per batch when scaled."""
    sampler = StepBatchSampler(len(dataset), batch_size, order=order, seed=seed, start_step=0, stop_step=steps,
                               per_batch_scale=scaled)
    return list(DataLoader(PositionSeededDataset(dataset), batch_sampler=sampler, num_workers=workers))


def test_loader_batches_share_scale_and_reproduce_under_seed(root):
    batches = step_batches(TrainDatasetScaled(root, crop_size=160), 3, seed=11, workers=2, scaled=True)
    assert len(batches) == 3 and batches[0]["image"].shape == (3, 3, 160, 160)
    assert batches[0]["original"].dtype == torch.uint8
    intervals = []
    for batch in batches:
        low, high = 0.0, 10.0
        for image_id, roi in zip(batch["id"], batch["roi"].numpy()):
            height, width = raw(root, image_id).shape[:2]
            top, bottom, left, right = roi_box(roi)
            for length, extent in ((height, bottom - top), (width, right - left)):
                a, b = _scale_interval(length, extent)
                low, high = max(low, a), min(high, b)
        assert low < high  # one scale explains every image of the batch
        assert 0.7 <= high and low <= 1.3
        intervals.append((low, high))
    assert len({round(low, 3) for low, _ in intervals}) > 1
    # the same seed gives the same batches, in worker processes or in the main process
    again = step_batches(TrainDatasetScaled(root, crop_size=160), 3, seed=11, workers=0, scaled=True)
    for first, second in zip(batches, again):
        assert first["id"] == second["id"] and torch.equal(first["image"], second["image"])
    other = step_batches(TrainDatasetScaled(root, crop_size=160), 3, seed=12, workers=2, scaled=True)
    assert any(not torch.equal(a["image"], b["image"]) for a, b in zip(batches, other) if a["id"] == b["id"]) or \
        [b["id"] for b in batches] != [b["id"] for b in other]


def test_init_batches_reproduce_under_seed_in_workers_and_main_process(root):
    def run(seed, workers):
        return step_batches(TrainDatasetInit(root, crop_size=96), 2, seed=seed, workers=workers, order="epochs")
    first = run(5, 2)
    for workers in (0, 2):
        second, other = run(5, workers), run(6, workers)
        assert all(torch.equal(a["original"], b["original"]) for a, b in zip(first, second))
        assert not all(torch.equal(a["original"], b["original"]) for a, b in zip(first, other))


def test_eval_dataset_items(root, copy_root):
    dataset = EvalDataset(root)
    assert dataset.ids == read_id_list(os.path.join(root, "ImageSets/Segmentation/val.txt"))
    labels = load_cls_labels(os.path.join(root, "cls_labels.npy"))
    item = dataset[2]
    image = raw(root, item["id"])
    np.testing.assert_array_equal(item["original"], image)
    np.testing.assert_allclose(item["image"].transpose(1, 2, 0), (image / 255.0 - MEAN) / STD, atol=1e-5)
    mask = np.array(Image.open(os.path.join(root, "SegmentationClass", item["id"] + ".png")))
    assert item["gt"].dtype == np.int64 and np.array_equal(item["gt"], mask) and (mask == 255).any()
    np.testing.assert_array_equal(item["label"], labels[item["id"]])
    # SegmentationClassAug (plain 8-bit) is used when SegmentationClass lacks the mask
    aug = os.path.join(copy_root, "SegmentationClassAug")
    os.makedirs(aug)
    Image.fromarray(mask).save(os.path.join(aug, item["id"] + ".png"))
    os.remove(os.path.join(copy_root, "SegmentationClass", item["id"] + ".png"))
    np.testing.assert_array_equal(EvalDataset(copy_root)[2]["gt"], mask)
    # without any mask or label file the keys are absent
    os.remove(os.path.join(aug, item["id"] + ".png"))
    os.remove(os.path.join(copy_root, "cls_labels.npy"))
    assert set(EvalDataset(copy_root)[2]) == {"id", "image", "original"}
    batch = next(iter(DataLoader(EvalDataset(root), batch_size=1)))
    assert batch["id"] == [dataset.ids[0]] and batch["gt"].shape == (1,) + dataset[0]["gt"].shape


def test_eval_dataset_from_folders_without_a_root(root, tmp_path):
    """infer_RRM's --IMpath / --LISTpath / --gt_dir: items read from the given folders only."""
    image_dir, gt_dir = os.path.join(root, "JPEGImages"), tmp_path / "gt"
    ids = read_id_list(os.path.join(root, "ImageSets/Segmentation/val.txt"))
    os.makedirs(gt_dir)
    mask = np.array(Image.open(os.path.join(root, "SegmentationClass", ids[1] + ".png")))
    Image.fromarray(mask).save(gt_dir / f"{ids[1]}.png")
    dataset = EvalDataset(ids=ids[:2], image_dir=image_dir, gt_dir=gt_dir)
    assert dataset.ids == ids[:2] and len(dataset) == 2
    first, second = dataset[0], dataset[1]
    assert set(first) == {"id", "image", "original"}  # no mask in gt_dir, no label file without a root
    np.testing.assert_array_equal(first["original"], raw(root, ids[0]))
    np.testing.assert_array_equal(second["gt"], mask)
    listed = EvalDataset(list_path=os.path.join(root, "ImageSets/Segmentation/val.txt"), image_dir=image_dir)
    assert listed.ids == ids and "gt" not in listed[1]
    with pytest.raises(FileNotFoundError, match=f"mask not found for {ids[0]}: .*gt has no {ids[0]}.png"):
        EvalDataset(ids=ids[:2], image_dir=image_dir, gt_dir=gt_dir, require_gt=True)
    with pytest.raises(FileNotFoundError, match="ground-truth folder not found: .*nogt"):
        EvalDataset(ids=ids, image_dir=image_dir, gt_dir=tmp_path / "nogt")
    with pytest.raises(FileNotFoundError, match="image folder not found: .*nojpeg"):
        EvalDataset(ids=ids, image_dir=tmp_path / "nojpeg")
    with pytest.raises(FileNotFoundError, match="1 image.* of the id list not found, first: .*absent.jpg"):
        EvalDataset(ids=["absent"], image_dir=image_dir)
    with pytest.raises(ValueError, match="without a VOC12 root, give the image folder"):
        EvalDataset(ids=ids)
    with pytest.raises(ValueError, match="give ids or a list file"):
        EvalDataset(root, os.path.join(root, "ImageSets/Segmentation/val.txt"), ids=ids)


# --- bad input: every error names the file --------------------------------------------------------

def test_missing_root_list_and_image(root, copy_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        TrainDatasetInit(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        TrainDatasetScaled(root, list_path=tmp_path / "missing.txt")
    os.remove(os.path.join(copy_root, "JPEGImages", "train_000004.jpg"))
    with pytest.raises(FileNotFoundError, match="train_000004.jpg"):
        TrainDatasetInit(copy_root)
    dataset = EvalDataset(copy_root, os.path.join(copy_root, "ImageSets/Segmentation/val.txt"))
    os.remove(os.path.join(copy_root, "JPEGImages", "val_000001.jpg"))  # vanishes after construction
    with pytest.raises(FileNotFoundError, match="val_000001.jpg"):
        dataset[1]


def test_id_absent_from_cls_labels(root, copy_root):
    labels = load_cls_labels(os.path.join(root, "cls_labels.npy"))
    del labels["train_000006"]
    np.save(os.path.join(copy_root, "cls_labels.npy"), labels)
    with pytest.raises(ValueError) as info:
        TrainDatasetScaled(copy_root)
    assert "train_000006" in str(info.value) and "cls_labels.npy" in str(info.value)
    with pytest.raises(FileNotFoundError, match="other.npy"):
        TrainDatasetInit(copy_root, cls_labels_path=os.path.join(copy_root, "other.npy"))


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupt_jpeg_names_file_also_in_worker(copy_root, damage):
    path = os.path.join(copy_root, "JPEGImages", "train_000000.jpg")
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(b"not a jpeg at all" if damage == "garbage" else data[: len(data) // 3])
    dataset = TrainDatasetInit(copy_root, crop_size=64)
    with pytest.raises(ValueError, match="train_000000.jpg"):
        dataset[0]
    loader = DataLoader(TrainDatasetScaled(copy_root, crop_size=64), batch_size=1, num_workers=1)
    with pytest.raises(ValueError, match="cannot decode image .*train_000000.jpg"):
        next(iter(loader))


def test_missing_and_mismatched_masks(copy_root):
    mask_path = os.path.join(copy_root, "SegmentationClass", "val_000000.png")
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(mask_path)
    with pytest.raises(ValueError, match=r"val_000000.png is 12x10 but its image is"):
        EvalDataset(copy_root)[0]
    os.remove(mask_path)
    assert "gt" not in EvalDataset(copy_root)[0]
    with pytest.raises(FileNotFoundError, match="val_000000.png"):
        EvalDataset(copy_root, require_gt=True)[0]
    Image.new("RGB", (5, 5)).save(mask_path)
    with pytest.raises(ValueError, match="val_000000.png has mode RGB"):
        EvalDataset(copy_root)[0]


@pytest.mark.parametrize("workers", [0, 2])
def test_training_images_are_decoded_before_training(voc_root, tmp_path, workers):
    root = tmp_path / "VOC2012"
    shutil.copytree(voc_root, root)
    dataset = TrainDatasetScaled(str(root), crop_size=64)
    dataset.check_images(workers)  # all good
    broken = root / "JPEGImages" / f"{dataset.ids[3]}.jpg"
    broken.write_bytes(broken.read_bytes()[:200])  # truncated mid-scan
    with pytest.raises(ValueError, match=f"1 image\\(s\\) of .* cannot be decoded, first: cannot decode image {broken}"):
        dataset.check_images(workers)
