"""Watching a run (issue 16): ground-truth masks cropped as their images, the region figures of each
update against a brute-force recount, TensorBoard events read back with tensorboard's reader,
training panels (online and `tool.visualize --training_panels`), and a run without ground truth."""
import io
import json
import os
import shutil
import time

import numpy as np
import pytest
import torch
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import IMAGES, SCALARS, EventAccumulator

import tool.engine as engine
import train_from_cls_weight
import train_from_init
from test_engine import crash_at, tiny_args
from test_region_quality import brute_force
from tool import plot_metrics, visualize
from tool.checkpoint import load_resume_checkpoint
from tool.engine import finalize_args, run_training
from tool.mining import cam_label_maps
from tool.visualize import GAP, TITLE_HEIGHT
from voc12.data import IMAGENET_MEAN, IMAGENET_STD, TrainDatasetInit, TrainDatasetScaled
from voc12.lists import LIST_DIR, save_cls_labels, write_id_list, write_plain_mask

pytestmark = pytest.mark.usefixtures("one_thread")

MEAN = np.array(IMAGENET_MEAN, np.float32)
STD = np.array(IMAGENET_STD, np.float32)
CROP = 16
# (height, width): one image wider and one taller than the crop on one side, shorter on the other.
COORDINATE_IMAGES = {"wide": (12, 20), "tall": (20, 12)}


# ---- the mask goes through the image's own transform -----------------------------------------

def coordinate_root(path, mask_of):
    """A VOC-layout root whose images say where each pixel came from (R = 10·row, G = 10·col; PNG
    bytes under the .jpg name, so lossless) and whose masks are mask_of(rows, cols)."""
    labels = {}
    for image_id, (height, width) in COORDINATE_IMAGES.items():
        rows, cols = np.mgrid[:height, :width]
        image = np.stack([10 * rows, 10 * cols, np.zeros_like(rows)], axis=-1).astype(np.uint8)
        os.makedirs(path / "JPEGImages", exist_ok=True)
        os.makedirs(path / "SegmentationClass", exist_ok=True)
        Image.fromarray(image).save(path / "JPEGImages" / f"{image_id}.jpg", format="PNG")
        write_plain_mask(path / "SegmentationClass" / f"{image_id}.png", mask_of(rows, cols))
        labels[image_id] = np.eye(20, dtype=np.float32)[0]
    write_id_list(path / LIST_DIR / "train_aug.txt", list(COORDINATE_IMAGES))
    save_cls_labels(path / "cls_labels.npy", labels)
    return str(path)


@pytest.fixture(scope="module")
def coordinate_roots(tmp_path_factory):
    base = tmp_path_factory.mktemp("coordinates")
    return {"rows": coordinate_root(base / "rows", lambda rows, cols: rows),
            "cols": coordinate_root(base / "cols", lambda rows, cols: cols)}


def make_dataset(kind, root, seed):
    if kind == "scaled":
        return TrainDatasetScaled(root, crop_size=CROP, seed=seed, load_gt=True)
    dataset = TrainDatasetInit(root, crop_size=CROP, seed=seed, load_gt=True,
                               apply_random_resize=kind == "init resized", resize_long=(8, 30))
    dataset.color_jitter = lambda image: image  # its seed is still drawn: the stream is unchanged
    return dataset


def pixel_coordinates(kind, item):
    """(rows, cols) (H,W) float that the crop's image pixels came from, read off their colour."""
    if kind == "scaled":
        rgb = (item["image"].transpose(1, 2, 0) * STD + MEAN) * 255.0
    else:
        rgb = item["original"].transpose(1, 2, 0).astype(np.float64)
    return rgb[..., 0] / 10.0, rgb[..., 1] / 10.0


# Exact without a resize; a nearest mask is within half a pixel of a bilinear image (cv2), and of
# PIL's bicubic one up to its rounding to integer colours.
@pytest.mark.parametrize("kind, scales, tolerance", [("init", [None], 1e-9), ("init resized", [None], 0.65),
                                                      ("scaled", [1.0], 1e-3), ("scaled", [0.7, 1.3], 0.5 + 1e-3)])
def test_the_mask_is_cropped_with_the_images_flip_scale_and_offset(coordinate_roots, kind, scales, tolerance):
    flips, padded = set(), set()
    for seed in range(12):
        for index in range(len(COORDINATE_IMAGES)):
            for scale in scales:
                fetch = index if scale is None else (index, scale)
                row_item = make_dataset(kind, coordinate_roots["rows"], seed)[fetch]
                col_item = make_dataset(kind, coordinate_roots["cols"], seed)[fetch]
                roi = row_item["roi"] > 0
                np.testing.assert_array_equal(row_item["roi"], col_item["roi"])
                for item in (row_item, col_item):
                    assert item["gt"].shape == (CROP, CROP) and item["gt"].dtype == np.uint8
                    assert (item["gt"][~roi] == 255).all() and (item["gt"][roi] != 255).all()  # padding void
                rows, cols = pixel_coordinates(kind, row_item)
                assert np.abs(rows[roi] - row_item["gt"][roi]).max() <= tolerance
                assert np.abs(cols[roi] - col_item["gt"][roi]).max() <= tolerance
                flips.add(bool(np.diff(cols[roi].reshape(int(roi.any(1).sum()), -1), axis=1).mean() < 0))
                padded.add(not roi.all())
    assert flips == {False, True} and True in padded


@pytest.mark.parametrize("dataset_class, fetch", [(TrainDatasetInit, lambda i: i),
                                                  (TrainDatasetScaled, lambda i: (i, 0.85))])
def test_loading_the_masks_changes_no_image_crop_and_no_later_draw(voc_root, dataset_class, fetch):
    plain, with_gt = dataset_class(voc_root, crop_size=48, seed=5), dataset_class(voc_root, crop_size=48, seed=5,
                                                                                 load_gt=True)
    for index in [0, 3, 1, 3, 5]:  # no reseeding: each item draws on from the last one's stream
        a, b = plain[fetch(index)], with_gt[fetch(index)]
        assert set(b) - set(a) == {"gt"} and a["id"] == b["id"]
        for key in ("image", "original", "roi", "label"):
            np.testing.assert_array_equal(a[key], b[key])


def test_the_fixed_item_is_the_centred_crop_without_augmentation(coordinate_roots):
    for dataset_class in (TrainDatasetInit, TrainDatasetScaled):
        dataset = dataset_class(coordinate_roots["cols"], crop_size=CROP, seed=0, load_gt=True)
        item = dataset.fixed_item(0)  # wide: 12 rows padded by 2 above, 20 cols cut to 2..17
        assert np.flatnonzero(item["roi"].any(1)).tolist() == list(range(2, 14)) and item["roi"].any(0).all()
        np.testing.assert_array_equal(item["gt"][5], np.arange(2, 18))
        kind = "scaled" if dataset_class is TrainDatasetScaled else "init"
        np.testing.assert_allclose(pixel_coordinates(kind, item)[1][5], np.arange(2, 18), atol=1e-3)


def test_ids_without_a_mask_are_void_and_a_set_without_masks_gives_none(coordinate_roots, tmp_path):
    root = shutil.copytree(coordinate_roots["rows"], tmp_path / "partial")
    os.remove(root / "SegmentationClass" / "tall.png")
    dataset = TrainDatasetScaled(root, crop_size=CROP, seed=0, load_gt=True)
    assert dataset.gives_gt and dataset.mask_paths[1] is None
    assert (dataset[(1, 1.0)]["gt"] == 255).all() and (dataset[(0, 1.0)]["gt"] != 255).any()
    os.remove(root / "SegmentationClass" / "wide.png")
    dataset = TrainDatasetInit(root, crop_size=CROP, seed=0, load_gt=True)
    assert not dataset.gives_gt and "gt" not in dataset[0] and "gt" not in dataset.fixed_item(0)


def test_a_mask_with_a_label_of_no_class_names_its_file(coordinate_roots, tmp_path):
    root = shutil.copytree(coordinate_roots["rows"], tmp_path / "bad")
    write_plain_mask(root / "SegmentationClass" / "wide.png", np.full((12, 20), 21, np.uint8))
    with pytest.raises(ValueError, match=r"wide.png has labels \[21\] outside 0..20 and 255"):
        TrainDatasetScaled(root, crop_size=CROP, load_gt=True)[(0, 1.0)]


# ---- the CAM pseudo label before the CRFs ----------------------------------------------------

def test_cam_label_maps_is_the_numpy_argmax_over_all_channels():
    rng = np.random.default_rng(4)
    labels = np.zeros((3, 6), np.float32)
    labels[0, [1, 4]] = 1
    labels[1] = 1  # every class present: the bg takes their plain max
    norm_cams = rng.random((3, 6, 5, 7), dtype=np.float32) * labels[:, :, None, None]
    norm_cams[0, 1, 0, :3] = [1.0, 0.999, 0.0]
    expected = []
    for norm_cam in norm_cams:  # image 2 has no class: all background
        background = (1 - norm_cam.max(axis=0, keepdims=True)) ** 32
        expected.append(np.argmax(np.concatenate((background, norm_cam)), axis=0))
    labelled = cam_label_maps(norm_cams, labels)
    assert labelled.dtype == torch.int64
    np.testing.assert_array_equal(labelled.numpy(), np.stack(expected))
    assert labelled[0, 0, 0] == 2 and not labelled[2].any() and len(np.unique(expected[1])) > 2
    np.testing.assert_array_equal(cam_label_maps(torch.from_numpy(norm_cams), torch.from_numpy(labels)).numpy(),
                                  np.stack(expected))


# ---- a watched run --------------------------------------------------------------------------

def read_events(log_dir):
    events = EventAccumulator(str(log_dir), size_guidance={SCALARS: 0, IMAGES: 0})
    events.Reload()
    return events


def read_metrics(save_dir, session):
    with open(os.path.join(save_dir, f"{session}metrics.jsonl")) as handle:
        return [json.loads(line) for line in handle]


def record_counted_maps(monkeypatch):
    """Every (label map, gt) the engine counts, in call order: mined then CAM labels of each update."""
    seen = []
    real_count = engine.count_region_quality

    def count(label_map, gt, num_labels, roi=None):
        seen.append((np.asarray(torch.as_tensor(label_map)), np.asarray(gt)))
        return real_count(label_map, gt, num_labels, roi)

    monkeypatch.setattr(engine, "count_region_quality", count)
    return seen


def recount(label_map, gt, num_labels=21):
    valid, kept, correct, kept_c, correct_c = brute_force(label_map, gt, np.ones(gt.shape), num_labels)
    return np.array([valid, kept, correct, *kept_c, *correct_c])


WATCH = ["--tensorboard", "--vis_every", "3", "--vis_images", "2", "--region_quality"]
RUN = ["--max_step", "4", "--seed", "5", "--session_name", "w_", "--log_every", "1"]


@pytest.fixture(scope="module")
def watched_run(voc_root, tmp_path_factory):
    """train_from_init, 4 updates (3 classification-only, 1 joint), watched and not."""
    monkeypatch = pytest.MonkeyPatch()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the one_thread fixture, for the whole module's runs
    seen = record_counted_maps(monkeypatch)
    save_dir = tmp_path_factory.mktemp("watched")
    result = run_training(tiny_args(train_from_init, voc_root, save_dir, *RUN, *WATCH))
    monkeypatch.undo()
    plain_dir = tmp_path_factory.mktemp("plain")
    plain = run_training(tiny_args(train_from_init, voc_root, plain_dir, *RUN))
    torch.set_num_threads(threads)
    return {"dir": save_dir, "result": result, "seen": seen, "plain_dir": plain_dir, "plain": plain}


def test_each_joint_update_logs_the_figures_of_a_brute_force_recount(watched_run):
    records = read_metrics(watched_run["dir"], "w_")
    assert [r["classification_only"] for r in records] == [True, True, True, False]
    quality_keys = {"precision", "coverage", "cam_precision", "cam_coverage"}
    assert all(not quality_keys & set(r) for r in records[:3])  # no mining in phase 1
    mined, cam = [recount(*pair) for pair in watched_run["seen"]]  # one joint update: mined, then CAM
    assert mined[0] > 0 and 0 < mined[1] < mined[0]
    assert records[3]["precision"] == pytest.approx(mined[2] / mined[1])
    assert records[3]["coverage"] == pytest.approx(mined[1] / mined[0])
    assert records[3]["cam_precision"] == pytest.approx(cam[2] / cam[1])
    assert records[3]["cam_coverage"] == 1.0  # the CAM label labels every pixel
    with open(watched_run["dir"] / "w_region_quality.json") as handle:
        summary = json.load(handle)
    assert summary["counts"] == {"": mined.tolist(), "cam_": cam.tolist()}
    assert summary["first_step"] == 0 and summary["steps_done"] == 4
    names = ("background",) + engine.resolve_dataset("voc12").class_names
    assert summary["per_class_precision"] == {
        names[label]: pytest.approx(mined[3 + 21 + label] / mined[3 + label]) for label in range(21) if mined[3 + label]}
    with open(watched_run["dir"] / "w_.log") as handle:
        assert f"precision {100 * records[3]['precision']:.1f}%" in handle.read().splitlines()[-1]


def test_watching_changes_neither_the_weights_nor_the_losses(watched_run):
    watched = torch.load(watched_run["result"].final_weights, weights_only=True)
    plain = torch.load(watched_run["plain"].final_weights, weights_only=True)
    assert all(torch.equal(watched[name], plain[name]) for name in plain)
    for a, b in zip(read_metrics(watched_run["dir"], "w_"), read_metrics(watched_run["plain_dir"], "w_")):
        assert {k: v for k, v in a.items() if k in b and k != "time"} == {k: v for k, v in b.items() if k != "time"}
    assert not os.path.exists(watched_run["plain_dir"] / "tensorboard")
    assert not os.path.exists(watched_run["plain_dir"] / "w_region_quality.json")


def test_tensorboard_holds_every_term_lr_speed_figure_and_the_panels(watched_run):
    events = read_events(watched_run["dir"] / "tensorboard" / "w_")
    records = read_metrics(watched_run["dir"], "w_")
    terms = ["cls", "ce", "dense", "total"]
    assert sorted(events.Tags()["scalars"]) == sorted(
        [f"loss/{t}" for t in terms] + [f"lr/group{g}" for g in range(4)] + ["speed/images_per_second"]
        + [f"regions/{f}" for f in ("precision", "coverage", "cam_precision", "cam_coverage")])
    assert [(e.step, e.value) for e in events.Scalars("loss/cls")] == [
        (r["step"], pytest.approx(r["cls"])) for r in records]
    assert [e.step for e in events.Scalars("loss/ce")] == [3]
    assert [(e.step, e.value) for e in events.Scalars("lr/group2")] == [
        (r["step"], pytest.approx(r["lr"][2])) for r in records]
    assert [(e.step, e.value) for e in events.Scalars("regions/precision")] == [(3, pytest.approx(records[3]["precision"]))]
    assert all(e.value > 0 for e in events.Scalars("speed/images_per_second"))
    ids = sorted(events.Tags()["images"])
    assert ids == ["panels/train_000000", "panels/train_000001"]  # the first --vis_images ids of the list
    for tag in ids:
        panels = events.Images(tag)
        assert [p.step for p in panels] == [0, 3]
        phase1, joint = (np.asarray(Image.open(io.BytesIO(p.encoded_image_string))) for p in panels)
        assert phase1.shape == joint.shape == (TITLE_HEIGHT + 64, 4 * 64 + 3 * GAP, 3)
        tile = lambda panel, i: panel[TITLE_HEIGHT:, i * (64 + GAP):i * (64 + GAP) + 64]  # noqa: E731
        assert (tile(phase1, 2) == 128).mean() > 0.8 and (tile(phase1, 3) == 128).mean() > 0.8  # "n/a" in phase 1
        assert (tile(joint, 2) == 128).mean() < 0.5 and np.array_equal(tile(phase1, 0), tile(joint, 0))


def test_the_curves_of_a_watched_run_plot_into_a_png(watched_run, tmp_path):
    out = plot_metrics.main([str(watched_run["dir"]), "--out", str(tmp_path / "curves.png")])
    with open(out, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert Image.open(out).size == (1400, 900)
    figure = plot_metrics.build_figure(plot_metrics.read_run(plot_metrics.find_metrics_file(str(watched_run["dir"]))))
    quality = next(a for a in figure.axes if a.get_title().startswith("Reliable-region"))
    assert sorted(line.get_label() for line in quality.get_lines()) == ["cam_coverage", "cam_precision",
                                                                        "coverage", "precision"]


def test_the_offline_training_panels_are_the_logged_ones(watched_run, tmp_path, voc_root):
    events = read_events(watched_run["dir"] / "tensorboard" / "w_")
    logged = np.asarray(Image.open(io.BytesIO(events.Images("panels/train_000001")[-1].encoded_image_string)))
    # The resume checkpoint holds the model after update 3, the last logged panel's; it records the run's settings.
    from_checkpoint = visualize.main(["--training_panels", "--weights", watched_run["result"].resume_checkpoint,
                                      "--ids", "train_000001", "--out_dir", str(tmp_path / "a"), "--device", "cpu"])
    assert [os.path.basename(p) for p in from_checkpoint] == ["train_000001_training_panel.png"]
    np.testing.assert_array_equal(np.asarray(Image.open(from_checkpoint[0])), logged)
    from_weights = visualize.main(["--training_panels", "--weights", watched_run["result"].final_weights, "--width",
                                   "0.0625", "--voc12_root", voc_root, "--crop_size", "64", "--augmentation", "init",
                                   "--num", "2", "--out_dir", str(tmp_path / "b"), "--device", "cpu"])
    np.testing.assert_array_equal(np.asarray(Image.open(from_weights[1])), logged)


@pytest.mark.parametrize("argv, message", [
    (["--no_crf"], "--no_crf applies to the evaluation panels"),
    (["--weights", "w.pth"], "give --crop_size"),
])
def test_training_panel_flags_that_do_not_apply_are_errors(watched_run, argv, message, capsys):
    base = ["--training_panels", "--weights", watched_run["result"].resume_checkpoint]
    with pytest.raises(SystemExit):
        visualize.main(base + argv + ["--voc12_root", "x"])
    assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        visualize.main(["--weights", "w.pth", "--voc12_root", "x", "--crop_size", "64"])
    assert "--crop_size applies to --training_panels only" in capsys.readouterr().err


def test_without_ground_truth_no_figure_is_logged_and_nothing_fails(voc_root, tmp_path):
    root = shutil.copytree(voc_root, tmp_path / "voc")
    shutil.rmtree(root / "SegmentationClass")
    save_dir = tmp_path / "run"
    result = run_training(tiny_args(train_from_cls_weight, str(root), save_dir, "--max_step", "1", "--session_name",
                                    "n_", "--tensorboard", "--region_quality"))
    assert result.steps_done == 2
    records = read_metrics(save_dir, "n_")
    assert records and all(not any("precision" in k or "coverage" in k for k in r) for r in records)
    assert not any(tag.startswith("regions/") for tag in read_events(save_dir / "tensorboard" / "n_").Tags()["scalars"])
    assert not os.path.exists(save_dir / "n_region_quality.json")
    with open(save_dir / "n_.log") as handle:
        assert "--region_quality: none of the 6 ids of" in handle.read()


def test_a_resumed_watched_run_continues_the_totals_and_purges_the_redone_events(voc_root, tmp_path, monkeypatch):
    argv = ["--max_step", "3", "--seed", "2", "--save_every", "2", "--session_name", "r_", "--tensorboard",
            "--region_quality"]
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    run_training(tiny_args(train_from_cls_weight, voc_root, straight_dir, *argv))
    crash_at(monkeypatch, 3, RuntimeError("killed"))  # updates 0-2 logged, the checkpoint at 2
    with pytest.raises(RuntimeError, match="killed"):
        run_training(tiny_args(train_from_cls_weight, voc_root, split_dir, *argv))
    monkeypatch.undo()
    # TensorBoard reads a folder's event files in the order of the time (in seconds) in their names.
    time.sleep(1.0)
    run_training(tiny_args(train_from_cls_weight, voc_root, split_dir, *argv, "--resume", str(split_dir / "r_resume.pt")))
    summaries = []
    for save_dir in (straight_dir, split_dir):
        with open(save_dir / "r_region_quality.json") as handle:
            summaries.append(json.load(handle))
    assert summaries[0] == summaries[1] and summaries[1]["first_step"] == 0 and summaries[1]["steps_done"] == 4
    straight, split = (read_events(d / "tensorboard" / "r_") for d in (straight_dir, split_dir))
    assert len(os.listdir(split_dir / "tensorboard" / "r_")) == 2  # the interrupted run's file and the resumed one's
    for tag in ("loss/total", "regions/precision", "lr/group0"):
        assert [(e.step, e.value) for e in split.Scalars(tag)] == [(e.step, e.value) for e in straight.Scalars(tag)]
    assert [e.step for e in split.Scalars("loss/total")] == [0, 1, 2, 3]


def test_watching_flags_need_tensorboard_and_positive_counts(voc_root, tmp_path):
    with pytest.raises(ValueError, match="--vis_every needs --tensorboard"):
        finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--max_step", "1", "--vis_every", "5"))
    with pytest.raises(ValueError, match="--vis_images must be >= 1, got 0"):
        finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--max_step", "1", "--tensorboard",
                                "--vis_images", "0"))
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--max_step", "1", "--tensorboard"))
    assert (args.vis_every, args.vis_images) == (engine.VIS_EVERY, engine.VIS_IMAGES)
    plain = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--max_step", "1"))
    assert (plain.tensorboard, plain.region_quality, plain.vis_every, plain.vis_images) == (False, False, None, None)


def test_the_resume_checkpoint_records_no_watching_flag(watched_run):
    config = load_resume_checkpoint(watched_run["result"].resume_checkpoint)["run_config"]
    assert not {"tensorboard", "vis_every", "vis_images", "region_quality"} & set(config)
