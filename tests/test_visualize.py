import os

import numpy as np
import pytest
import torch
from PIL import Image

import network
from tool.inference import image_label
from tool.visualize import GAP, PANEL_TITLES, TITLE_HEIGHT, cam_heatmap, colorize, main, render_panel
from voc12.synthetic import generate_dataset

WIDTH = 0.0625


def test_colorize_uses_voc_palette_and_white_ignore():
    labels = np.array([[0, 1, 15], [20, 255, 12]])
    rgb = colorize(labels)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, 3, 3)
    # VOC colour map: 1 aeroplane (128,0,0), 15 person (192,128,128), 20 tvmonitor (0,64,128), 12 dog (64,0,128)
    assert rgb[0].tolist() == [[0, 0, 0], [128, 0, 0], [192, 128, 128]]
    assert rgb[1].tolist() == [[0, 64, 128], [255, 255, 255], [64, 0, 128]]
    with pytest.raises(ValueError, match=r"labels must be \(H,W\)"):
        colorize(np.zeros((2, 2, 1), int))


def test_cam_heatmap_blends_jet_of_the_class_maximum():
    image = np.zeros((4, 5, 3), np.uint8)
    cam = np.zeros((20, 4, 5), np.float32)
    cam[3, 0, 0] = 1.0
    heat = cam_heatmap(image, cam, alpha=1.0)
    assert heat.shape == (4, 5, 3)
    assert heat[0, 0].tolist() == [128, 0, 0]  # JET at 1.0 is dark red
    assert heat[1, 1].tolist() == [0, 0, 128]  # JET at 0 is dark blue


def test_render_panel_size_and_missing_tiles():
    tiles = [np.full((30, 40, 3), 10 * i, np.uint8) for i in range(6)]
    tiles[1] = None
    panel = render_panel(tiles)
    assert panel.shape == (TITLE_HEIGHT + 30, 6 * 40 + 5 * GAP, 3)
    assert (panel[TITLE_HEIGHT:, 40 + GAP:80 + GAP] == 128).mean() > 0.9  # grey n/a tile
    assert (panel[TITLE_HEIGHT + 5, 2 * (40 + GAP) + 5] == 20).all()
    with pytest.raises(ValueError, match="one size"):
        render_panel([np.zeros((3, 4, 3), np.uint8), np.zeros((3, 5, 3), np.uint8)], titles=("a", "b"))


def test_image_label_from_gt():
    gt = np.array([[0, 1], [15, 255]])
    label = image_label({"gt": gt})
    assert np.flatnonzero(label).tolist() == [0, 14]
    assert image_label({}) is None


@pytest.mark.parametrize("name", ["network.RRM", "network.RRM(attention)"])
def test_cli_writes_panels_of_the_expected_size(tmp_path, name):
    root = tmp_path / "voc"
    generate_dataset(root, num_train=1, num_val=2, seed=2, size_min=64, size_max=80)
    torch.manual_seed(0)
    model = network.build_segnet(name, WIDTH)
    torch.save(model.state_dict(), tmp_path / "w.pth")
    paths = main(["--weights", str(tmp_path / "w.pth"), "--network", name, "--width", str(WIDTH),
                  "--voc12_root", str(root), "--ids", "val_000001", "--out_dir", str(tmp_path / "panels")])
    assert paths == [str(tmp_path / "panels" / "val_000001_panel.png")]
    with Image.open(root / "JPEGImages" / "val_000001.jpg") as image:
        width, height = image.size
    with Image.open(paths[0]) as panel:
        assert panel.mode == "RGB"
        assert panel.size == (len(PANEL_TITLES) * width + (len(PANEL_TITLES) - 1) * GAP, TITLE_HEIGHT + height)
        pixels = np.array(panel)
    assert np.array_equal(pixels[TITLE_HEIGHT:, :width], np.array(Image.open(root / "JPEGImages" / "val_000001.jpg")))
    gt = np.array(Image.open(root / "SegmentationClass" / "val_000001.png"))
    assert np.array_equal(pixels[TITLE_HEIGHT:, width + GAP:2 * width + GAP], colorize(gt))
    with pytest.raises(ValueError, match="ids not in the image list: nope"):
        main(["--weights", str(tmp_path / "w.pth"), "--network", name, "--width", str(WIDTH),
              "--voc12_root", str(root), "--ids", "nope", "--out_dir", str(tmp_path / "panels")])
    assert os.listdir(tmp_path / "panels") == ["val_000001_panel.png"]
