"""TensorBoard monitor: events read back with tensorboard's own reader; the training panel's layout."""
import io
import sys

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

from tool.run_monitor import RunMonitor, training_scalars
from tool.visualize import GAP, TITLE_HEIGHT, training_panel
from voc12.lists import VOC_PALETTE


def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})  # 0: keep every event
    events.Reload()
    return events


def scalar_series(events, tag):
    return [(event.step, event.value) for event in events.Scalars(tag)]


def palette_colours(labels, palette):
    """Independent colouring: palette row per pixel, 255 white."""
    rgb = np.zeros(labels.shape + (3,), np.uint8)
    for y in range(labels.shape[0]):
        for x in range(labels.shape[1]):
            rgb[y, x] = (255, 255, 255) if labels[y, x] == 255 else palette[labels[y, x]]
    return rgb


def test_training_scalars_name_the_tags():
    scalars = training_scalars({"cls": 0.5, "ce": 2.0}, [1e-3, 2e-3], images_per_second=12.5,
                               quality={"precision": 0.9, "cam_coverage": None})
    assert scalars == {"loss/cls": 0.5, "loss/ce": 2.0, "lr/group0": 1e-3, "lr/group1": 2e-3,
                       "speed/images_per_second": 12.5, "regions/precision": 0.9, "regions/cam_coverage": None}
    assert training_scalars({"cls": 0.5}, [0.01]) == {"loss/cls": 0.5, "lr/group0": 0.01}


def test_scalars_and_panels_read_back_with_tensorboards_reader(tmp_path):
    rng = np.random.default_rng(0)
    panel = rng.integers(0, 256, (30, 50, 3), dtype=np.uint8)
    with RunMonitor(tmp_path / "tb") as monitor:
        for step in range(3):
            terms = {"cls": torch.tensor(0.5 / (step + 1)), "total": 1.0 + step}
            quality = {"precision": None if step == 0 else 0.25 * step, "coverage": np.float64(0.1)}
            monitor.log_scalars(step, training_scalars(terms, [1e-3 * (3 - step), 0.02], 8.0, quality))
        monitor.log_panels(2, [("img_7", panel)])
    events = read_events(tmp_path / "tb")
    assert sorted(events.Tags()["scalars"]) == sorted(["loss/cls", "loss/total", "lr/group0", "lr/group1",
                                                       "speed/images_per_second", "regions/precision",
                                                       "regions/coverage"])
    # Scalars are stored as float32.
    assert scalar_series(events, "loss/cls") == [(0, pytest.approx(0.5)), (1, pytest.approx(0.25)),
                                                 (2, pytest.approx(0.5 / 3))]
    assert scalar_series(events, "lr/group0") == [(0, pytest.approx(3e-3)), (1, pytest.approx(2e-3)),
                                                  (2, pytest.approx(1e-3))]
    assert scalar_series(events, "loss/total") == [(0, 1.0), (1, 2.0), (2, 3.0)]
    assert scalar_series(events, "regions/precision") == [(1, 0.25), (2, 0.5)]  # None at step 0: no point
    assert [event.step for event in events.Scalars("regions/coverage")] == [0, 1, 2]
    assert events.Tags()["images"] == ["panels/img_7"]
    (image,) = events.Images("panels/img_7")
    assert image.step == 2 and (image.width, image.height) == (50, 30)
    assert np.array_equal(np.array(Image.open(io.BytesIO(image.encoded_image_string))), panel)


def test_a_resumed_run_hides_the_redone_steps(tmp_path):
    with RunMonitor(tmp_path) as monitor:
        for step in range(5):
            monitor.log_scalars(step, {"loss/total": float(step)})
    with RunMonitor(tmp_path, purge_step=3) as monitor:
        for step in range(3, 5):
            monitor.log_scalars(step, {"loss/total": 10.0 * step})
    assert scalar_series(read_events(tmp_path), "loss/total") == [(0, 0.0), (1, 1.0), (2, 2.0), (3, 30.0),
                                                                  (4, 40.0)]


def test_training_panel_quarters_are_their_sources_colourings():
    height, width, classes = 12, 16, 20
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    norm_cam = np.zeros((classes, height, width), np.float32)
    norm_cam[4] = rng.random((height, width))
    norm_cam[9, :, : width // 2] = 1.0  # the left half: the other present class is at its maximum
    reliable = rng.integers(0, 21, (height, width))
    reliable[rng.random(reliable.shape) < 0.3] = 255
    prediction = rng.integers(0, 21, (height, width))
    panel = training_panel(image, norm_cam, reliable, prediction)
    assert panel.shape == (TITLE_HEIGHT + height, 4 * width + 3 * GAP, 3)
    tiles = [panel[TITLE_HEIGHT:, i * (width + GAP):i * (width + GAP) + width] for i in range(4)]
    strongest = np.maximum(norm_cam[4], norm_cam[9])
    jet = cv2.cvtColor(cv2.applyColorMap(np.rint(strongest * 255).astype(np.uint8), cv2.COLORMAP_JET),
                       cv2.COLOR_BGR2RGB)
    expected_cam = np.rint(0.5 * jet.astype(np.float32) + 0.5 * image.astype(np.float32)).astype(np.uint8)
    assert np.array_equal(tiles[0], image)
    assert np.array_equal(tiles[1], expected_cam)
    assert np.array_equal(tiles[2], palette_colours(reliable, VOC_PALETTE))
    assert np.array_equal(tiles[3], palette_colours(prediction, VOC_PALETTE))
    for i in range(3):  # white gaps between the tiles
        assert (panel[:, (i + 1) * width + i * GAP:(i + 1) * (width + GAP)] == 255).all()


def test_training_panel_takes_the_data_sets_colouring_and_draws_missing_tiles_grey():
    height, width = 24, 30
    image = np.zeros((height, width, 3), np.uint8)
    palette = np.random.default_rng(2).integers(0, 256, (256, 3), dtype=np.uint8)  # e.g. 81 COCO labels
    labels = np.arange(height * width).reshape(height, width) % 81
    labels[0, 0] = 255
    panel = training_panel(image, None, labels, None,
                           colorize_labels=lambda l: palette_colours(l, palette))
    tiles = [panel[TITLE_HEIGHT:, i * (width + GAP):i * (width + GAP) + width] for i in range(4)]
    assert np.array_equal(tiles[2], palette_colours(labels, palette))
    assert (tiles[1] == 128).mean() > 0.8 and (tiles[3] == 128).mean() > 0.8  # grey "n/a"


def test_bad_inputs_are_named():
    image = np.zeros((4, 5, 3), np.uint8)
    with pytest.raises(ValueError, match=r"reliable must be \(H,W\) = \(4, 5\)"):
        training_panel(image, None, np.zeros((4, 4), int), None)
    with pytest.raises(ValueError, match=r"norm_cam must be \(C,4,5\)"):
        training_panel(image, np.zeros((20, 5, 4)), None, None)
    with pytest.raises(ValueError, match=r"image must be \(H,W,3\) uint8"):
        training_panel(image.astype(np.float32), None, None, None)


def test_monitor_rejects_bad_values(tmp_path):
    with RunMonitor(tmp_path) as monitor:
        with pytest.raises(ValueError, match="loss/cls must be a number or None"):
            monitor.log_scalars(0, {"loss/cls": "high"})
        with pytest.raises(ValueError, match="step must be an int >= 0"):
            monitor.log_scalars(-1, {"loss/cls": 1.0})
        with pytest.raises(ValueError, match=r"panel p must be \(H,W,3\) uint8"):
            monitor.log_panels(0, [("p", np.zeros((4, 5), np.uint8))])


def test_missing_tensorboard_names_the_flag(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(ValueError, match="--tensorboard needs the tensorboard package"):
        RunMonitor(tmp_path / "tb")
    assert not (tmp_path / "tb").exists()
