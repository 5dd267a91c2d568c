"""The demo's steps at a tiny size: data, both training phases, evaluation, results.json, panels."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from tool import demo
from tool.evaluate import evaluate_folders
from tool.visualize import GAP, TITLE_HEIGHT
from voc12.lists import read_id_list

TINY = ["--num_train", "8", "--num_val", "3", "--size_min", "40", "--size_max", "48", "--classes", "bird,person",
        "--width", "0.0625", "--crop_size", "48", "--batch_size", "2", "--max_step", "4", "--cls_steps", "2", "--num_panels", "2",
        "--mining_workers", "0", "--num_workers", "0", "--crf_workers", "0", "--no_progress"]


def test_dataset_is_reused_only_with_the_same_options(tmp_path):
    args = demo.build_parser().parse_args(TINY)
    options = demo.data_options(args)
    root = str(tmp_path / "data")
    assert demo.ensure_dataset(root, options) is True
    assert demo.ensure_dataset(root, options) is False
    assert demo.ensure_dataset(root, {**options, "num_val": 4}) is True
    assert len(read_id_list(os.path.join(root, "ImageSets", "Segmentation", "val.txt"))) == 4


def test_demo_end_to_end_tiny(tmp_path, capsys):
    out = str(tmp_path / "demo")
    results = demo.main(["--out", out] + TINY)
    with open(os.path.join(out, "results.json")) as handle:
        written = json.load(handle)
    for key in demo.RESULT_KEYS:
        assert 0.0 <= written[key] <= 1.0
        assert written[key] == pytest.approx(results[key])
    assert written["num_val_images"] == 3
    # both phases of train_from_init ran: classification-only updates, then joint ones
    with open(os.path.join(out, "run", "demo_metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert [r["classification_only"] for r in records] == [True, True, True, False]
    # the run is watched: the joint update's figures, the curves, TensorBoard events
    assert "precision" not in records[2] and 0.0 <= records[3]["cam_precision"] <= 1.0
    assert written["reliable_regions"]["cam_precision"] == pytest.approx(records[3]["cam_precision"])
    assert Image.open(written["curves"]).format == "PNG"
    assert os.listdir(os.path.join(out, "run", "tensorboard", "demo_"))
    assert os.path.isfile(written["weights"])
    # the no-CRF / CRF mIoU agree with scoring the written PNGs independently
    ids = read_id_list(os.path.join(out, "data", "ImageSets", "Segmentation", "val.txt"))
    gt_dir = os.path.join(out, "data", "SegmentationClass")
    for kind, key in (("no_crf", "rrm_miou"), ("crf", "rrm_crf_miou")):
        matrix = evaluate_folders(os.path.join(out, "pred", kind), gt_dir, ids)
        assert matrix.compute()["mean_iou"] == pytest.approx(written[key], abs=1e-9)
    assert [os.path.basename(p) for p in written["panels"]] == [f"{i}_panel.png" for i in ids[:2]]
    for path, image_id in zip(written["panels"], ids):
        height, width = np.asarray(Image.open(os.path.join(out, "data", "JPEGImages", image_id + ".jpg"))).shape[:2]
        assert np.asarray(Image.open(path)).shape == (TITLE_HEIGHT + height, 6 * width + 5 * GAP, 3)
    printed = capsys.readouterr().out
    assert "CAM pseudo labels" in printed and "RRM segmentation + CRF" in printed
    assert f"{100 * written['rrm_crf_miou']:5.1f}" in printed


def test_phase_and_data_flags_reach_the_engine_and_the_generator():
    import train_from_init
    from tool.engine import build_parser
    from tool.schedule import LearningRateSchedule

    args = demo.build_parser().parse_args(TINY + ["--seg_lr", "0.004", "--object_scale", "0.3", "0.4",
                                                  "--max_clutter", "2"])
    training = build_parser(train_from_init.DEFAULTS).parse_args(demo.training_argv(args, "root", "run"))
    assert (training.cls_steps, training.seg_lr, training.max_step, training.weights) == (2, 0.004, 4, "none")
    assert training.no_progress  # the demo's --no_progress also silences the training bar
    assert training.train_bn and training.optimizer == "adam"  # the from-scratch recipe (README)
    schedule = LearningRateSchedule(training.schedule, [training.lr] * 4, training.max_step,
                                    training.cls_steps, training.seg_lr)
    # phase 1 = updates 0..2 (the released t - 1 < cls_steps), then one joint update at seg_lr
    assert [schedule.classification_only(t) for t in range(4)] == [True, True, True, False]
    assert schedule.lrs_at(2) == pytest.approx([0.004] * 4)
    assert demo.data_options(args)["object_scale"] == [0.3, 0.4] and demo.data_options(args)["max_clutter"] == 2


@pytest.mark.parametrize("flags, message", [(["--num_panels", "5", "--num_val", "3"], "--num_panels 5 exceeds"),
                                            (["--max_step", "0"], "--max_step must be >= 1"),
                                            (["--max_step", "50"], "--cls_steps 800 must be in 1..max_step-1 (49)")])
def test_bad_flags_are_named(flags, message, capsys):
    with pytest.raises(SystemExit):
        demo.main(flags)
    assert message in capsys.readouterr().err
