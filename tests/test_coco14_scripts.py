"""The three scripts end to end with --dataset coco14 on a tiny generated COCO set (CPU, width 0.0625)."""
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import infer_RRM
import train_from_cls_weight
import train_from_init
from coco14.lists import CLASS_NAMES, split_of_id
from coco14.prepare import prepare
from coco14.synthetic import generate_dataset
from network import build_segnet
from tool import evaluate, visualize
from tool.checkpoint import atomic_save, payload_sha256
from tool.engine import build_parser, finalize_args, run_training
from voc12.lists import read_id_list
from test_engine import tiny_argv

# pycocotools' decode under numpy 2: library noise, not ours.
PYCOCOTOOLS_NUMPY2 = pytest.mark.filterwarnings("ignore:__array__ implementation doesn't accept a copy keyword")
pytestmark = [pytest.mark.usefixtures("one_thread"), PYCOCOTOOLS_NUMPY2]
WIDTH = 0.0625


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco") / "COCO2014"
    generate_dataset(root, num_train=6, num_val=3, seed=7, size_min=48, size_max=72)
    prepare(root, workers=0, progress=False)
    return str(root)


def coco_argv(root, save_dir, *extra):
    return ["--dataset", "coco14", "--data_root", root, "--weights", "none", "--width", str(WIDTH),
            "--crop_size", "48", "--batch_size", "2", "--num_workers", "0", "--mining_workers", "0",
            "--device", "cpu", "--save_dir", str(save_dir), "--no_progress", *extra]


def parse(script, argv):
    return build_parser(script.DEFAULTS).parse_args(argv)


@pytest.fixture(scope="module")
def coco_weights(coco_root, tmp_path_factory):
    """train_from_init.py --dataset coco14, both phases (2 classification + 2 joint updates)."""
    save_dir = tmp_path_factory.mktemp("coco_run")
    result = run_training(parse(train_from_init, coco_argv(coco_root, save_dir, "--max_step", "4")))
    return result


def test_train_from_init_trains_an_80_class_network(coco_weights):
    assert coco_weights.steps_done == 4 and coco_weights.final_weights.endswith("RRM_coco14_final.pth")
    state = torch.load(coco_weights.final_weights, weights_only=True)
    assert state["fc8.weight"].shape[0] == 80 and state["fc8_seg_conv2.weight"].shape[0] == 81
    assert sorted(state) == sorted(build_segnet("network.RRM", WIDTH).state_dict())  # the released names
    with open(os.path.join(os.path.dirname(coco_weights.final_weights), "RRM_coco14_metrics.jsonl")) as handle:
        records = [json.loads(line) for line in handle]
    assert [r["classification_only"] for r in records] == [True, True, True, False]
    assert {"cls", "ce", "dense"} <= set(records[3]) and all(np.isfinite(records[3][k]) for k in ("ce", "dense"))


@pytest.mark.parametrize("network", ["network.RRM", "network.RRM(attention)"])
def test_train_from_cls_weight_takes_a_coco_classification_checkpoint(coco_root, tmp_path, network):
    torch.manual_seed(0)
    classifier = {key: value for key, value in build_segnet(network, WIDTH, 80).state_dict().items()
                  if not key.startswith(("fc8_seg_conv", "GAU_w"))}  # backbone + fc8, as res38_cls.pth
    torch.save(classifier, tmp_path / "coco_cls.pth")
    argv = coco_argv(coco_root, tmp_path / "run", "--network", network, "--max_step", "1")
    argv[argv.index("--weights") + 1] = str(tmp_path / "coco_cls.pth")
    result = run_training(parse(train_from_cls_weight, argv))
    assert result.steps_done == 2 and set(result.last_terms) >= {"cls", "ce", "dense"}
    final = torch.load(result.final_weights, weights_only=True)
    torch.testing.assert_close(final["b2.bn_branch2a.weight"], classifier["b2.bn_branch2a.weight"])  # frozen BN
    assert final["fc8_seg_conv2.weight"].shape[0] == 81


def test_a_voc_checkpoint_in_a_coco_run_names_the_head_shapes(coco_root, tmp_path):
    torch.save(build_segnet("network.RRM", WIDTH).state_dict(), tmp_path / "voc.pth")
    argv = coco_argv(coco_root, tmp_path / "run", "--max_step", "1")
    argv[argv.index("--weights") + 1] = str(tmp_path / "voc.pth")
    with pytest.raises(ValueError, match=r"voc.pth does not fit .*class heads are for 20 classes but the model's "
                                         r"for 80 \(fc8.weight: file \(20, 256, 1, 1\) vs model \(80, 256, 1, 1\); "
                                         r"fc8_seg_conv2.weight: file \(21, 32, 3, 3\) vs model \(81, 32, 3, 3\)"):
        run_training(parse(train_from_cls_weight, argv))


def test_dataset_flags_that_would_be_ignored_are_errors(coco_root, tmp_path):
    with pytest.raises(ValueError, match="--voc12_root is the VOC spelling of --data_root; with --dataset coco14"):
        finalize_args(parse(train_from_init, ["--dataset", "coco14", "--voc12_root", coco_root, "--max_step", "2"]))
    with pytest.raises(ValueError, match="--IMpath is the VOC image folder; COCO-2014 images are found under"):
        finalize_args(parse(train_from_init, coco_argv(coco_root, tmp_path, "--max_step", "2",
                                                       "--IMpath", os.path.join(coco_root, "train2014"))))
    with pytest.raises(ValueError, match="give one"):
        finalize_args(parse(train_from_init, ["--voc12_root", "a", "--data_root", "b", "--max_step", "2"]))
    args = finalize_args(parse(train_from_init, ["--dataset", "coco14", "--data_root", coco_root]))
    # The documented COCO recipe: 12 epochs of batch 8, crop 448, lr 0.01 (unmeasured).
    assert (args.max_epoches, args.batch_size, args.crop_size, args.lr) == (12, 8, 448, 0.01)
    assert args.train_list == os.path.join(coco_root, "ImageSets", "train2014.txt")
    assert finalize_args(parse(train_from_cls_weight, ["--dataset", "coco14"])).max_step == 80000
    with pytest.raises(FileNotFoundError, match="--data_root not found: COCO2014 is not a directory"):
        run_training(parse(train_from_init, ["--dataset", "coco14", "--weights", "none", "--max_step", "1",
                                             "--save_dir", str(tmp_path)]))


def test_a_resume_checkpoint_from_before_data_root_continues(voc_root, tmp_path):
    # Checkpoints written before --dataset and --data_root record the root as voc12_root, no dataset.
    first = run_training(parse(train_from_init, tiny_argv(voc_root, tmp_path, "--max_step", "3")), stop_after=1)
    payload = torch.load(first.resume_checkpoint, weights_only=True)
    del payload["sha256"]
    config = payload["run_config"]
    config["voc12_root"] = config.pop("data_root")
    del config["dataset"]
    atomic_save({**payload, "sha256": payload_sha256(payload)}, first.resume_checkpoint)
    resumed = run_training(parse(train_from_init, tiny_argv(voc_root, tmp_path, "--max_step", "3",
                                                            "--resume", first.resume_checkpoint)))
    assert resumed.steps_done == 3
    elsewhere = shutil.copytree(voc_root, tmp_path / "VOC2012")
    with pytest.raises(ValueError, match="a different run: .*; data_root: checkpoint '[^']*voc0/VOC2012' vs now"):
        run_training(parse(train_from_init, tiny_argv(str(elsewhere), tmp_path, "--max_step", "3",
                                                      "--resume", first.resume_checkpoint)))


def loop_confusion_miou(pairs, num_labels):
    """mIoU from a confusion matrix built pixel by pixel: IoU of each label with a union, averaged."""
    confusion = np.zeros((num_labels, num_labels), np.int64)
    for gt, pred in pairs:
        for g, p in zip(gt.ravel().tolist(), pred.ravel().tolist()):
            if g != 255:
                confusion[g, p] += 1
    ious = [confusion[c, c] / (confusion[c].sum() + confusion[:, c].sum() - confusion[c, c])
            for c in range(num_labels) if confusion[c].sum() + confusion[:, c].sum() > 0]
    return sum(ious) / len(ious)


def test_infer_scores_val2014_with_81_labels(coco_root, coco_weights, tmp_path):
    base = ["--dataset", "coco14", "--data_root", coco_root, "--weights", coco_weights.final_weights,
            "--width", str(WIDTH), "--num_workers", "0", "--no_progress"]
    summary = infer_RRM.main(base + ["--out_cam_pred", str(tmp_path / "no_crf"), "--out_la_crf", str(tmp_path / "crf"),
                                     "--summary", str(tmp_path / "summary.json")])
    ids = read_id_list(os.path.join(coco_root, "ImageSets", "val2014.txt"))
    assert summary["num_images"] == summary["num_images_with_gt"] == len(ids) == 3
    assert summary["gt_dir"] == os.path.join(coco_root, "SegmentationClass", "{split}")
    for kind in ("no_crf", "crf"):
        pairs = [(np.array(Image.open(os.path.join(coco_root, "SegmentationClass", split_of_id(i), i + ".png"))),
                  np.array(Image.open(tmp_path / kind / f"{i}.png"))) for i in ids]
        assert summary[kind]["mean_iou"] == pytest.approx(loop_confusion_miou(pairs, 81), rel=1e-12)
        assert list(summary[kind]["iou"]) == ["background", *CLASS_NAMES]
    assert json.loads((tmp_path / "summary.json").read_text())["no_crf"] == summary["no_crf"]
    # --split fixes the folders (the same ones here), with multi-scale and flip as for VOC.
    fixed = infer_RRM.main(base + ["--split", "val2014", "--out_cam_pred", str(tmp_path / "fixed"), "--out_la_crf", "",
                                   "--scales", "0.75", "1", "--flip"])
    assert fixed["num_images_with_gt"] == 3 and fixed["gt_dir"] == os.path.join(coco_root, "SegmentationClass",
                                                                                 "val2014")
    # tool.evaluate gives the same mIoU from the folders
    scored = evaluate.main(["--dataset", "coco14", "--pred_dir", str(tmp_path / "crf"), "--gt_dir",
                            os.path.join(coco_root, "SegmentationClass", "val2014")])
    assert scored["mean_iou"] == pytest.approx(summary["crf"]["mean_iou"], rel=1e-12)
    # a COCO model cannot score VOC's 21 labels, nor a VOC model COCO's
    with pytest.raises(ValueError, match="class heads are for 80 classes but the model's for 20"):
        infer_RRM.main(["--voc12_root", coco_root, "--LISTpath", os.path.join(coco_root, "ImageSets", "val2014.txt"),
                        "--IMpath", os.path.join(coco_root, "val2014"), "--weights", coco_weights.final_weights,
                        "--width", str(WIDTH), "--out_cam_pred", str(tmp_path / "voc"), "--no_progress"])


def test_panels_of_a_coco_image(coco_root, coco_weights, tmp_path):
    image_id = read_id_list(os.path.join(coco_root, "ImageSets", "val2014.txt"))[0]
    paths = visualize.main(["--dataset", "coco14", "--data_root", coco_root, "--weights", coco_weights.final_weights,
                            "--width", str(WIDTH), "--ids", image_id, "--out_dir", str(tmp_path), "--no_crf"])
    with Image.open(os.path.join(coco_root, "val2014", image_id + ".jpg")) as image:
        width = image.width
    with Image.open(paths[0]) as panel:
        assert panel.width == 6 * width + 5 * visualize.GAP
        pixels = np.array(panel)
    gt = np.array(Image.open(os.path.join(coco_root, "SegmentationClass", "val2014", image_id + ".png")))
    tile = pixels[visualize.TITLE_HEIGHT:, width + visualize.GAP:2 * width + visualize.GAP]
    np.testing.assert_array_equal(tile, visualize.colorize(gt))
