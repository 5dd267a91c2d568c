import filecmp
import os
import xml.etree.ElementTree as ET

import numpy as np
import pytest
from PIL import Image

from voc12 import synthetic
from voc12.lists import CLASS_INDEX, CLASS_NAMES, VOC_PALETTE, load_cls_labels, read_id_list


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate_dataset(root, num_train=24, num_val=8, seed=5, size_min=64, size_max=96)
    return str(root)


def _objects(root, image_id):
    xml = ET.parse(os.path.join(root, "Annotations", image_id + ".xml")).getroot()
    result = []
    for obj in xml.iter("object"):
        box = obj.find("bndbox")
        result.append((obj.find("name").text, tuple(int(box.find(t).text) for t in ("xmin", "ymin", "xmax", "ymax")),
                       obj.find("truncated").text == "1"))
    size = xml.find("size")
    return result, (int(size.find("height").text), int(size.find("width").text))


def _ids(root):
    return read_id_list(os.path.join(root, "ImageSets/Segmentation/train.txt")) + \
        read_id_list(os.path.join(root, "ImageSets/Segmentation/val.txt"))


def test_tree_layout_and_lists(tree):
    seg = os.path.join(tree, "ImageSets", "Segmentation")
    assert read_id_list(os.path.join(seg, "train.txt")) == [f"train_{i:06d}" for i in range(24)]
    assert read_id_list(os.path.join(seg, "val.txt")) == [f"val_{i:06d}" for i in range(8)]
    assert read_id_list(os.path.join(seg, "train_aug.txt")) == read_id_list(os.path.join(seg, "train.txt"))
    labels = load_cls_labels(os.path.join(tree, "cls_labels.npy"))
    assert sorted(labels) == sorted(_ids(tree))
    for image_id in _ids(tree):
        for folder, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("SegmentationClass", ".png")):
            assert os.path.isfile(os.path.join(tree, folder, image_id + ext))


def test_mask_classes_match_xml_and_label_vectors(tree):
    labels = load_cls_labels(os.path.join(tree, "cls_labels.npy"))
    for image_id in _ids(tree):
        mask = np.array(Image.open(os.path.join(tree, "SegmentationClass", image_id + ".png")))
        objects, (height, width) = _objects(tree, image_id)
        assert mask.shape == (height, width) == Image.open(os.path.join(tree, "JPEGImages", image_id + ".jpg")).size[::-1]
        mask_classes = {CLASS_NAMES[v - 1] for v in np.unique(mask) if 0 < v < 255}
        assert mask_classes == {name for name, _, _ in objects}
        assert {CLASS_NAMES[i] for i in np.flatnonzero(labels[image_id])} == mask_classes
        assert mask_classes <= set(synthetic.DEFAULT_CLASSES)
        assert 1 <= len(objects) <= 3
        for name, (xmin, ymin, xmax, ymax), _ in objects:
            assert 1 <= xmin <= xmax <= width and 1 <= ymin <= ymax <= height
        # every pixel of a class lies inside one of that class's (1-based, inclusive) boxes
        for name in mask_classes:
            inside = np.zeros_like(mask, bool)
            for other, (xmin, ymin, xmax, ymax), _ in objects:
                if other == name:
                    inside[ymin - 1:ymax, xmin - 1:xmax] = True
            assert not np.any((mask == CLASS_INDEX[name] + 1) & ~inside)


def test_palette_png_with_voc_colours(tree):
    mask = Image.open(os.path.join(tree, "SegmentationClass", "train_000000.png"))
    assert mask.mode == "P"
    palette = np.array(mask.getpalette()[:768]).reshape(256, 3)
    np.testing.assert_array_equal(palette, VOC_PALETTE)
    # hand-known VOC colours: background, aeroplane, person, tvmonitor, ignore
    assert VOC_PALETTE[0].tolist() == [0, 0, 0]
    assert VOC_PALETTE[1].tolist() == [128, 0, 0]
    assert VOC_PALETTE[15].tolist() == [192, 128, 128]
    assert VOC_PALETTE[20].tolist() == [0, 64, 128]
    assert VOC_PALETTE[255].tolist() == [224, 224, 192]


def test_ignore_band_separates_every_pair_of_regions(tree):
    for image_id in _ids(tree):
        mask = np.array(Image.open(os.path.join(tree, "SegmentationClass", image_id + ".png")))
        for a, b in ((mask[:, 1:], mask[:, :-1]), (mask[1:, :], mask[:-1, :])):
            touching = (a != b) & (a != 255) & (b != 255)
            assert not touching.any(), image_id
        assert 0 < (mask == 255).mean() < 0.25
        # every object region has 255 pixels next to it
        for value in np.unique(mask):
            if 0 < value < 255:
                region = mask == value
                grown = np.zeros_like(region)
                grown[1:] |= region[:-1]
                grown[:-1] |= region[1:]
                assert (mask[grown & ~region] == 255).any()


def test_scene_statistics_truncation_overlap_cooccurrence(tree):
    truncated, multi_class, counts = 0, 0, set()
    for image_id in _ids(tree):
        objects, _ = _objects(tree, image_id)
        truncated += any(t for _, _, t in objects)
        multi_class += len({n for n, _, _ in objects}) >= 2
        counts.add(len(objects))
    assert truncated >= 3 and multi_class >= 3
    assert counts >= {1, 2}


def test_deterministic_per_seed_and_per_image(tmp_path, tree):
    synthetic.generate_dataset(tmp_path / "same", 24, 8, seed=5, size_min=64, size_max=96)
    for folder, ext in (("JPEGImages", ".jpg"), ("SegmentationClass", ".png"), ("Annotations", ".xml")):
        for image_id in ("train_000003", "val_000007"):
            assert filecmp.cmp(os.path.join(tree, folder, image_id + ext),
                               os.path.join(tmp_path / "same", folder, image_id + ext), shallow=False)
    # val images do not depend on the number of train images; another seed changes them
    synthetic.generate_dataset(tmp_path / "fewer", 2, 8, seed=5, size_min=64, size_max=96)
    assert filecmp.cmp(os.path.join(tree, "JPEGImages/val_000004.jpg"),
                       os.path.join(tmp_path / "fewer", "JPEGImages/val_000004.jpg"), shallow=False)
    synthetic.generate_dataset(tmp_path / "other", 2, 2, seed=6, size_min=64, size_max=96)
    assert not filecmp.cmp(os.path.join(tree, "JPEGImages/val_000001.jpg"),
                           os.path.join(tmp_path / "other", "JPEGImages/val_000001.jpg"), shallow=False)


def test_class_option_and_size_range(tmp_path):
    synthetic.generate_dataset(tmp_path, 30, 1, seed=1, size_min=70, size_max=80, classes="cow,sheep")
    labels = load_cls_labels(tmp_path / "cls_labels.npy")
    present = np.stack(list(labels.values())).sum(0)
    assert set(np.flatnonzero(present)) == {CLASS_INDEX["cow"], CLASS_INDEX["sheep"]}
    for image_id in labels:
        width, height = Image.open(tmp_path / "JPEGImages" / (image_id + ".jpg")).size
        assert 70 <= width <= 80 and 70 <= height <= 80
    assert synthetic.parse_classes("all") == CLASS_NAMES
    assert synthetic.parse_classes(None) == synthetic.DEFAULT_CLASSES


def test_every_class_has_shape_style_and_companions():
    assert set(synthetic.SHAPES) == set(synthetic.STYLES) == set(synthetic.COMPANIONS) == set(CLASS_NAMES)
    assert all(s.texture in synthetic.TEXTURES for s in synthetic.STYLES.values())
    rng = np.random.default_rng(0)
    for name in CLASS_NAMES:
        placement = synthetic.Placement(name, (50.0, 50.0), 30.0, 0.3, 1.0, False)
        whole, accent = synthetic.object_masks(placement, 100, 100)
        assert whole.sum() > 300 and 0 < accent.sum() < whole.sum() and not np.any(accent & ~whole)
        assert synthetic.texture_field(synthetic.STYLES[name].texture, *placement.local_coordinates(8, 8), 2.0, rng).shape == (8, 8)


def test_cli_writes_tree_and_reports_bad_options(tmp_path, capsys):
    synthetic.main(["--out", str(tmp_path), "--num_train", "3", "--num_val", "2", "--seed", "1",
                    "--size_min", "64", "--size_max", "64", "--classes", "person,cat"])
    assert "train 3, val 2, train_aug 3" in capsys.readouterr().out
    assert len(read_id_list(tmp_path / "ImageSets/Segmentation/val.txt")) == 2
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path), "--classes", "person,unicorn"])
    assert exit_info.value.code == 2 and "unicorn" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--out", str(tmp_path), "--size_min", "100", "--size_max", "50"])
    assert "size_min=100" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        synthetic.main(["--help"])
    assert exit_info.value.code == 0 and "--num_train" in capsys.readouterr().out


def test_object_scale_and_clutter_options(tmp_path, tree):
    # the documented defaults are what generate_dataset used before these options existed
    synthetic.generate_dataset(tmp_path / "explicit", 24, 8, seed=5, size_min=64, size_max=96,
                               object_scale=(0.22, 0.5), max_clutter=8)
    for image_id in ("train_000005", "val_000002"):
        assert filecmp.cmp(os.path.join(tree, "JPEGImages", image_id + ".jpg"),
                           os.path.join(tmp_path / "explicit", "JPEGImages", image_id + ".jpg"), shallow=False)

    def foreground_fraction(root):
        masks = [np.asarray(Image.open(os.path.join(root, "SegmentationClass", i + ".png"))) for i in _ids(root)]
        return np.mean([(m > 0).mean() for m in masks])

    synthetic.generate_dataset(tmp_path / "big", 24, 8, seed=5, size_min=64, size_max=96,
                               object_scale=(0.4, 0.6), max_clutter=0)
    assert foreground_fraction(tmp_path / "big") > foreground_fraction(tree) + 0.05
    with pytest.raises(ValueError, match=r"object_scale must be 0 < min <= max <= 1.*\(0\.5, 0\.3\)"):
        synthetic.generate_dataset(tmp_path / "bad", 1, 1, object_scale=(0.5, 0.3))
    with pytest.raises(ValueError, match="max_clutter must be >= 0, got -1"):
        synthetic.generate_dataset(tmp_path / "bad", 1, 1, max_clutter=-1)
