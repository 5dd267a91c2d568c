import os

import numpy as np
import pytest
import scipy.io
from PIL import Image

from voc12 import make_cls_labels, make_lists
from voc12.lists import CLASS_INDEX, load_cls_labels, read_id_list, write_id_list, write_palette_mask

XML = """<annotation><filename>{id}.jpg</filename>{objects}</annotation>"""
OBJECT = "<object><name>{name}</name><bndbox><xmin>1</xmin><ymin>1</ymin><xmax>5</xmax><ymax>5</ymax></bndbox>{parts}</object>"


def write_xml(root, image_id, names, parts=""):
    os.makedirs(os.path.join(root, "Annotations"), exist_ok=True)
    objects = "".join(OBJECT.format(name=n, parts=parts) for n in names)
    with open(os.path.join(root, "Annotations", image_id + ".xml"), "w") as handle:
        handle.write(XML.format(id=image_id, objects=objects))


def one_hot(*names):
    vector = np.zeros(20, np.float32)
    for name in names:
        vector[CLASS_INDEX[name]] = 1
    return vector


@pytest.fixture
def voc_with_xml(tmp_path):
    write_xml(tmp_path, "2007_000001", ["person", "dog", "person"], parts="<part><name>head</name></part>")
    write_xml(tmp_path, "2007_000002", ["tvmonitor"])
    write_xml(tmp_path, "2007_000003", [])
    write_xml(tmp_path, "2007_000004", ["aeroplane", "unknownthing"])
    seg = tmp_path / "ImageSets" / "Segmentation"
    write_id_list(seg / "train_aug.txt", ["2007_000001", "2007_000002", "2007_000003"], pairs=True)
    write_id_list(seg / "val.txt", ["2007_000004"])
    return tmp_path


def test_read_id_list_accepts_both_formats(tmp_path):
    (tmp_path / "ids.txt").write_text("2007_000032\n2008_001234\n\n")
    (tmp_path / "pairs.txt").write_text("/JPEGImages/2007_000032.jpg /SegmentationClassAug/2007_000032.png\n"
                                        "/JPEGImages/2008_001234.jpg /SegmentationClassAug/2008_001234.png\n")
    assert read_id_list(tmp_path / "ids.txt") == read_id_list(tmp_path / "pairs.txt") == ["2007_000032", "2008_001234"]
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(ValueError, match="empty.txt contains no ids"):
        read_id_list(tmp_path / "empty.txt")


def test_make_cls_labels_defaults(voc_with_xml, capsys):
    make_cls_labels.main(["--voc12_root", str(voc_with_xml)])
    assert "4 ids (3 with at least one class)" in capsys.readouterr().out
    labels = load_cls_labels(voc_with_xml / "cls_labels.npy")
    expected = {"2007_000001": one_hot("person", "dog"), "2007_000002": one_hot("tvmonitor"),
                "2007_000003": one_hot(), "2007_000004": one_hot("aeroplane")}
    assert sorted(labels) == sorted(expected)
    for image_id, vector in expected.items():
        assert labels[image_id].dtype == np.float32
        np.testing.assert_array_equal(labels[image_id], vector)


def test_make_cls_labels_explicit_lists_and_errors(voc_with_xml, tmp_path, capsys):
    (tmp_path / "a.txt").write_text("2007_000002\n")
    make_cls_labels.main(["--voc12_root", str(voc_with_xml), "--train_list", str(tmp_path / "a.txt"),
                          "--val_list", str(tmp_path / "a.txt"), "--out", str(tmp_path / "out" / "labels.npy")])
    assert list(load_cls_labels(tmp_path / "out" / "labels.npy")) == ["2007_000002"]
    (tmp_path / "b.txt").write_text("2007_000009\n")
    with pytest.raises(SystemExit) as info:
        make_cls_labels.main(["--voc12_root", str(voc_with_xml), "--train_list", str(tmp_path / "b.txt")])
    assert info.value.code == 2 and "2007_000009.xml" in capsys.readouterr().err
    (voc_with_xml / "Annotations" / "2007_000002.xml").write_text("<annotation><object>")
    with pytest.raises(SystemExit):
        make_cls_labels.main(["--voc12_root", str(voc_with_xml)])
    assert "cannot parse annotation" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        make_cls_labels.main(["--voc12_root", str(tmp_path / "absent")])
    assert "absent" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        make_cls_labels.main(["--help"])
    assert info.value.code == 0 and "--train_list" in capsys.readouterr().out


def fake_voc_and_sbd(tmp_path):
    voc, sbd = tmp_path / "VOC2012", tmp_path / "benchmark_RELEASE" / "dataset"
    seg = voc / "ImageSets" / "Segmentation"
    write_id_list(seg / "train.txt", ["a", "b"])
    write_id_list(seg / "val.txt", ["c", "d"], pairs=True)
    os.makedirs(voc / "SegmentationClass")
    voc_masks = {}
    for value, image_id in enumerate("abcd", start=1):
        mask = np.full((6, 7), value, np.uint8)
        mask[0] = 255
        write_palette_mask(voc / "SegmentationClass" / f"{image_id}.png", mask)
        voc_masks[image_id] = mask
    os.makedirs(sbd / "cls")
    sbd_masks = {}
    for value, image_id in enumerate(["e", "f", "a", "c"], start=10):
        mask = np.arange(30, dtype=np.uint8).reshape(5, 6) % 21
        mask[0, 0] = value
        scipy.io.savemat(sbd / "cls" / f"{image_id}.mat",
                         {"GTcls": {"Segmentation": mask, "Boundaries": np.zeros(1), "CategoriesPresent": np.ones(1)}})
        sbd_masks[image_id] = mask
    write_id_list(sbd / "train.txt", ["e", "a"])
    write_id_list(sbd / "val.txt", ["f", "c"])
    return voc, sbd, voc_masks, sbd_masks


def test_make_lists_from_fake_sbd_tree(tmp_path, capsys):
    voc, sbd, voc_masks, sbd_masks = fake_voc_and_sbd(tmp_path)
    make_lists.main(["--voc12_root", str(voc), "--sbd_root", str(sbd)])
    assert capsys.readouterr().out.strip() == "train: 2, val: 2, train_aug: 4 (converted 4 SBD masks)"
    seg = voc / "ImageSets" / "Segmentation"
    assert read_id_list(seg / "train_aug.txt") == ["a", "b", "e", "f"]  # SBD + VOC train - VOC val
    assert read_id_list(seg / "val.txt") == ["c", "d"] and read_id_list(seg / "train.txt") == ["a", "b"]
    aug = voc / "SegmentationClassAug"
    assert sorted(os.listdir(aug)) == ["a.png", "b.png", "c.png", "d.png", "e.png", "f.png"]
    for image_id in "ef":
        converted = Image.open(aug / f"{image_id}.png")
        assert converted.mode == "L"
        np.testing.assert_array_equal(np.array(converted), sbd_masks[image_id])
    for image_id in "abcd":  # VOC12's own masks take precedence over SBD's
        np.testing.assert_array_equal(np.array(Image.open(aug / f"{image_id}.png")), voc_masks[image_id])
    # without --sbd_root: the Aug folder minus val, written elsewhere in the pairs format
    make_lists.main(["--voc12_root", str(voc), "--out_dir", str(tmp_path / "lists"), "--pairs"])
    assert "train_aug: 4" in capsys.readouterr().out
    lines = (tmp_path / "lists" / "train_aug.txt").read_text().splitlines()
    assert lines[0] == "/JPEGImages/a.jpg /SegmentationClassAug/a.png"
    assert read_id_list(tmp_path / "lists" / "train_aug.txt") == ["a", "b", "e", "f"]


def test_make_lists_errors_name_the_file(tmp_path, capsys):
    voc, sbd, _, _ = fake_voc_and_sbd(tmp_path)
    with pytest.raises(SystemExit) as info:
        make_lists.main(["--voc12_root", str(voc)])
    assert info.value.code == 2 and "SegmentationClassAug" in capsys.readouterr().err
    scipy.io.savemat(sbd / "cls" / "e.mat", {"other": np.zeros((2, 2))})
    with pytest.raises(SystemExit):
        make_lists.main(["--voc12_root", str(voc), "--sbd_root", str(sbd)])
    assert "cannot read GTcls.Segmentation from" in capsys.readouterr().err
    os.remove(sbd / "cls" / "e.mat")
    with pytest.raises(SystemExit):
        make_lists.main(["--voc12_root", str(voc), "--sbd_root", str(sbd)])
    assert "e.mat" in capsys.readouterr().err
    scipy.io.savemat(sbd / "cls" / "e.mat", {"GTcls": {"Segmentation": np.zeros((3, 3), np.uint8)}})
    os.remove(voc / "SegmentationClass" / "b.png")
    with pytest.raises(FileNotFoundError, match="b.png"):
        make_lists.convert_sbd(sbd, voc, ["b"])
    os.remove(voc / "ImageSets" / "Segmentation" / "val.txt")
    with pytest.raises(SystemExit):
        make_lists.main(["--voc12_root", str(voc), "--sbd_root", str(sbd)])
    assert "val.txt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        make_lists.main(["--help"])
    assert info.value.code == 0 and "--sbd_root" in capsys.readouterr().out
