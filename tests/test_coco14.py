"""COCO-2014 preparation and data sets on generated COCO-format files (coco14.synthetic, coco14.prepare)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pycocotools.mask as mask_utils
import pytest
from PIL import Image
from pycocotools.coco import COCO

from coco14 import data as coco_data
from coco14.lists import CATEGORY_IDS, CLASS_NAMES, COCO14, annotation_path, image_stem, split_of_id
from coco14.prepare import prepare, render_mask
from coco14.synthetic import generate_dataset, uncompressed_rle
from voc12.lists import VOC_PALETTE, load_cls_labels, read_id_list

from test_coco14_scripts import PYCOCOTOOLS_NUMPY2

pytestmark = PYCOCOTOOLS_NUMPY2
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPLITS = ("train2014", "val2014")


def make_coco(root, num_train=7, num_val=3, seed=4):
    generate_dataset(root, num_train=num_train, num_val=num_val, seed=seed, size_min=48, size_max=72)
    return prepare(root, workers=2, progress=False)


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "COCO2014"
    make_coco(root)
    return str(root)


@pytest.fixture
def copy_root(coco_root, tmp_path):
    shutil.copytree(coco_root, tmp_path / "COCO2014")
    return str(tmp_path / "COCO2014")


def kind(segmentation):
    if isinstance(segmentation, list):
        return "polygon"
    return "uncompressed" if isinstance(segmentation["counts"], list) else "compressed"


def pycocotools_mask(coco, image_id):
    """The stated rules on pycocotools' own rendering (COCO.annToMask): class index + 1 in annotation
    order, later over earlier; 255 where only crowds cover."""
    info = coco.imgs[image_id]
    mask = np.zeros((info["height"], info["width"]), np.uint8)
    crowd = np.zeros_like(mask, bool)
    for annotation in coco.imgToAnns[image_id]:
        covered = coco.annToMask(annotation).astype(bool)
        if annotation["iscrowd"]:
            crowd |= covered
        else:
            mask[covered] = CATEGORY_IDS.index(annotation["category_id"]) + 1
    mask[crowd & (mask == 0)] = 255
    return mask


@pytest.mark.parametrize("split", SPLITS)
def test_masks_equal_the_pycocotools_rendering_under_the_stated_rules(coco_root, split):
    coco = COCO(annotation_path(coco_root, split))
    seen = {"polygon": 0, "compressed": 0, "uncompressed": 0, "overwritten": 0, "crowd_only": 0, "crowd_under": 0}
    for image_id, info in coco.imgs.items():
        stem = os.path.splitext(info["file_name"])[0]
        with Image.open(os.path.join(coco_root, "SegmentationClass", split, stem + ".png")) as png:
            assert png.mode == "P" and png.getpalette()[:3 * 256] == VOC_PALETTE.reshape(-1).tolist()
            mask = np.array(png)
        np.testing.assert_array_equal(mask, pycocotools_mask(coco, image_id), err_msg=stem)
        # The generated files exercise every rule: each kind of segmentation, overlaps, crowds.
        annotations = coco.imgToAnns[image_id]
        for annotation in annotations:
            seen[kind(annotation["segmentation"])] += 1
        instance = [coco.annToMask(a).astype(bool) for a in annotations if not a["iscrowd"]]
        crowd = [coco.annToMask(a).astype(bool) for a in annotations if a["iscrowd"]]
        seen["overwritten"] += sum(int((earlier & later).sum()) for i, earlier in enumerate(instance)
                                   for later in instance[i + 1:])
        if crowd:
            covered = np.any(instance, axis=0) if instance else np.zeros_like(mask, bool)
            seen["crowd_only"] += int((crowd[0] & ~covered).sum())
            seen["crowd_under"] += int((crowd[0] & covered).sum())
    assert all(count > 0 for count in seen.values()), seen


def test_rules_on_a_hand_worked_image():
    # 4 x 6 image: a person rectangle (polygon), a dog over its right half (uncompressed RLE), and a
    # crowd (compressed RLE) over the bottom row, which the person covers on its left.
    person = [[0.5, 0.5, 3.5, 0.5, 3.5, 2.5, 0.5, 2.5]]  # pixel centres: rows 0..2 (+ edge), cols 0..3
    dog = np.zeros((4, 6), np.uint8)
    dog[0:2, 2:5] = 1
    crowd = np.zeros((4, 6), np.uint8)
    crowd[3, :] = 1
    crowd[2, 5] = 1
    compressed = mask_utils.encode(np.asfortranarray(crowd))
    instances = [(0, False, person), (CATEGORY_IDS.index(18), False, uncompressed_rle(dog)), (1, True, compressed)]
    person_mask = mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects(person, 4, 6))).astype(bool)
    expected = np.zeros((4, 6), np.uint8)
    expected[person_mask] = 1
    expected[0:2, 2:5] = CATEGORY_IDS.index(18) + 1  # dog (id 18) drawn later, over the person
    expected[(crowd == 1) & (expected == 0)] = 255
    assert expected[3].tolist().count(255) == 6 - int(person_mask[3].sum())  # the crowd only where nothing else is
    np.testing.assert_array_equal(render_mask(4, 6, instances), expected)
    assert CLASS_NAMES[CATEGORY_IDS.index(18)] == "dog" and (expected == 255).any() and (expected == 1).any()


def test_labels_and_lists_are_exact(coco_root):
    labels = load_cls_labels(os.path.join(coco_root, "cls_labels.npy"), 80)
    unlisted = 0
    for split in SPLITS:
        with open(annotation_path(coco_root, split)) as handle:
            document = json.load(handle)
        expected_list = []
        for image in document["images"]:
            stem = os.path.splitext(image["file_name"])[0]
            categories = {a["category_id"] for a in document["annotations"]
                          if a["image_id"] == image["id"] and not a["iscrowd"]}
            vector = np.zeros(80, np.float32)
            vector[[CATEGORY_IDS.index(c) for c in categories]] = 1
            np.testing.assert_array_equal(labels[stem], vector, err_msg=stem)
            if categories:
                expected_list.append(stem)
        listed = read_id_list(os.path.join(coco_root, "ImageSets", f"{split}.txt"))
        assert listed == expected_list
        unlisted += len(document["images"]) - len(listed)
    assert unlisted > 0  # the crowd-only images stay out of the lists, not out of the labels
    assert len(labels) == 10


def test_prepare_resumes_and_keeps_existing_masks(copy_root):
    mask_dir = os.path.join(copy_root, "SegmentationClass", "val2014")
    names = sorted(os.listdir(mask_dir))
    original = np.array(Image.open(os.path.join(mask_dir, names[0])))
    os.remove(os.path.join(mask_dir, names[0]))
    marker = np.full_like(np.array(Image.open(os.path.join(mask_dir, names[1]))), 7)
    Image.fromarray(marker).save(os.path.join(mask_dir, names[1]))
    summary = prepare(copy_root, ["val2014"], workers=0, progress=False)
    assert summary["val2014"]["masks_written"] == 1 and summary["val2014"]["masks_kept"] == len(names) - 1
    np.testing.assert_array_equal(np.array(Image.open(os.path.join(mask_dir, names[0]))), original)
    assert (np.array(Image.open(os.path.join(mask_dir, names[1]))) == 7).all()  # skipped, as it was there
    assert sorted(os.listdir(mask_dir)) == names  # no partial file left
    assert len(load_cls_labels(os.path.join(copy_root, "cls_labels.npy"), 80)) == 10  # train's labels kept


def test_bad_inputs_name_the_file(copy_root):
    val_json = annotation_path(copy_root, "val2014")
    document = json.load(open(val_json))
    os.rename(val_json, val_json + ".away")
    with pytest.raises(FileNotFoundError, match="annotation file not found: .*instances_val2014.json"):
        prepare(copy_root, workers=0, progress=False)
    os.rename(val_json + ".away", val_json)
    first_image = os.path.join(copy_root, "val2014", document["images"][0]["file_name"])
    os.rename(first_image, first_image + ".away")
    with pytest.raises(FileNotFoundError, match=f"listed in .*instances_val2014.json are not in .*: {first_image}"):
        prepare(copy_root, workers=0, progress=False)
    os.rename(first_image + ".away", first_image)

    def broken(change):
        edited = json.loads(json.dumps(document))
        change(edited)
        with open(val_json, "w") as handle:
            json.dump(edited, handle)
    broken(lambda d: d["images"][0].update(file_name="image_1.jpg"))
    with pytest.raises(ValueError, match="instances_val2014.json: image image_1.jpg does not name the split val2014"):
        prepare(copy_root, workers=0, progress=False)
    broken(lambda d: d["images"][0].update(height=d["images"][0]["height"] + 1))
    with pytest.raises(ValueError, match=f"{first_image} is \\d+x\\d+ but its annotation file says"):
        prepare(copy_root, workers=0, progress=False)
    document["annotations"][1]["category_id"] = 12  # a gap of COCO's ids
    with open(val_json, "w") as handle:
        json.dump(document, handle)
    bad_id = document["annotations"][1]["id"]
    with pytest.raises(ValueError, match=f"annotation {bad_id} has category_id 12, which is not among the file's"):
        prepare(copy_root, workers=0, progress=False)
    document["categories"] = document["categories"][:-1]
    with open(val_json, "w") as handle:
        json.dump(document, handle)
    with pytest.raises(ValueError, match="categories are not COCO 2014's 80 classes .*missing ids: \\[90\\]"):
        prepare(copy_root, workers=0, progress=False)
    completed = subprocess.run([sys.executable, "-m", "coco14.prepare", "--coco_root", copy_root, "--no_progress"],
                               cwd=REPO, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.startswith("prepare.py: error: ") and "categories" in completed.stderr


def test_cli_generates_and_prepares_with_a_summary_line(tmp_path):
    root = tmp_path / "coco"
    generated = subprocess.run([sys.executable, "-m", "coco14.synthetic", "--out", str(root), "--num_train", "2",
                                "--num_val", "1", "--size_min", "40", "--size_max", "48"],
                               cwd=tmp_path, capture_output=True, text=True, timeout=120,
                               env={**os.environ, "PYTHONPATH": REPO})
    assert generated.returncode == 0, generated.stderr
    prepared = subprocess.run([sys.executable, "-m", "coco14.prepare", "--coco_root", str(root), "--workers", "0"],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120,
                              env={**os.environ, "PYTHONPATH": REPO})
    assert prepared.returncode == 0, prepared.stderr
    lines = prepared.stdout.splitlines()
    assert lines[0].startswith("train2014: 2 images, ") and "masks: 2 written, 0 already there" in lines[0]
    assert lines[1].startswith("val2014: 1 images, ")
    assert "val2014 masks" in prepared.stderr  # the progress bar


def test_data_sets_find_images_by_the_split_in_their_name(coco_root):
    train = coco_data.TrainDatasetScaled(coco_root, crop_size=40)
    assert train.ids == read_id_list(os.path.join(coco_root, "ImageSets", "train2014.txt"))
    item = train[(0, 1.0)]
    assert item["label"].shape == (80,) and item["image"].shape == (3, 40, 40)
    init_item = coco_data.TrainDatasetInit(coco_root, crop_size=40)[1]
    assert init_item["original"].dtype == np.uint8 and init_item["label"].sum() >= 1
    # A list may mix splits: each image is read from its own split folder.
    val_ids = read_id_list(COCO14.list_path(coco_root, "val2014"))
    mixed = coco_data.EvalDataset(coco_root, ids=[train.ids[0], val_ids[0]])
    for image_id, entry in zip(mixed.ids, (mixed[0], mixed[1])):
        split = split_of_id(image_id)
        with Image.open(os.path.join(coco_root, split, image_id + ".jpg")) as image:
            np.testing.assert_array_equal(entry["original"], np.array(image.convert("RGB")))
        gt = np.array(Image.open(os.path.join(coco_root, "SegmentationClass", split, image_id + ".png")))
        np.testing.assert_array_equal(entry["gt"], gt)
    # --split fixes the folders whatever the names say.
    assert coco_data.EvalDataset(coco_root, split="val2014").ids == val_ids
    with pytest.raises(FileNotFoundError, match=f"not found, first: .*val2014/{train.ids[0]}.jpg"):
        coco_data.EvalDataset(coco_root, ids=train.ids[:1], split="val2014")
    with pytest.raises(ValueError, match="cannot tell the split of image '2007_000032'"):
        coco_data.EvalDataset(coco_root, ids=["2007_000032"])
    assert image_stem("val2014", 42) == "COCO_val2014_000000000042"
    assert split_of_id(image_stem("train2014", 9)) == "train2014"


def test_training_sets_crop_the_prepared_masks_with_their_images(coco_root):
    # --region_quality on COCO: each training id's mask from SegmentationClass/<its split>, 81 labels.
    for dataset_class in (coco_data.TrainDatasetInit, coco_data.TrainDatasetScaled):
        dataset = dataset_class(coco_root, crop_size=80, load_gt=True)  # larger than every image
        assert dataset.gives_gt and all(dataset.mask_paths)
        for index in range(len(dataset.ids)):
            item = dataset.fixed_item(index)
            mask = np.array(Image.open(os.path.join(coco_root, "SegmentationClass", "train2014",
                                                    dataset.ids[index] + ".png")))
            rows, cols = np.flatnonzero(item["roi"].any(1)), np.flatnonzero(item["roi"].any(0))
            np.testing.assert_array_equal(item["gt"][rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1], mask)
            assert (item["gt"][item["roi"] == 0] == 255).all()


def test_labels_of_another_class_count_are_refused(coco_root, tmp_path):
    with pytest.raises(ValueError, match="cls_labels.npy: label of .* has shape \\(80,\\), expected \\(20,\\)"):
        load_cls_labels(os.path.join(coco_root, "cls_labels.npy"))
