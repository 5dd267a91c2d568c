"""Training engine pieces: step-indexed batches, checkpoints, CAM -> pseudo label, one Trainer, errors."""
import os
import random

import cv2
import numpy as np
import pytest
import torch

import train_from_cls_weight
import train_from_init
from tool.checkpoint import (atomic_save, capture_rng_state, load_resume_checkpoint, restore_rng_state,
                             save_model_weights)
from tool.engine import Trainer, build_parser, finalize_args, mine_pseudo_labels, run_training, setup_runtime
from tool.mining import ReliableRegionMiner, mine_reliable_regions
from tool.train_batches import PositionSeededDataset, StepBatchSampler
from voc12.data import TrainDatasetScaled


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_argv(root, save_dir, *extra):
    """A CPU run of the tiny network on the synthetic set, no weights file, everything in-process."""
    return ["--voc12_root", root, "--weights", "none", "--width", "0.0625", "--crop_size", "64",
            "--batch_size", "2", "--num_workers", "0", "--mining_workers", "0", "--device", "cpu",
            "--save_dir", str(save_dir), *extra]


def tiny_args(script, root, save_dir, *extra):
    return build_parser(script.DEFAULTS).parse_args(tiny_argv(root, save_dir, *extra))


# ---- step-indexed batches -------------------------------------------------------------------

def test_epoch_order_is_a_fresh_permutation_per_epoch_and_ranks_split_the_global_batch():
    full = StepBatchSampler(10, 4, order="epochs", seed=5, start_step=0, stop_step=6)
    batches = [[item[0] for item in batch] for batch in full]
    assert full.steps_per_epoch == 2
    for epoch in range(3):
        seen = batches[2 * epoch] + batches[2 * epoch + 1]
        assert len(set(seen)) == 8 and set(seen) <= set(range(10))  # drop_last: 8 of 10, no repeat
    assert batches[0:2] != batches[2:4]
    ranks = [list(StepBatchSampler(10, 4, order="epochs", seed=5, start_step=0, stop_step=6, rank=r,
                                   world_size=2)) for r in range(2)]
    for step, batch in enumerate(full):
        assert ranks[0][step] + ranks[1][step] == batch


def test_stream_order_repeats_shuffled_lists_across_batch_boundaries_with_one_scale_per_batch():
    sampler = StepBatchSampler(5, 3, order="stream", seed=1, start_step=0, stop_step=5, per_batch_scale=True)
    batches = list(sampler)
    flat = [item[0] for batch in batches for item in batch]
    assert len(flat) == 15
    for repetition in range(3):
        assert sorted(flat[5 * repetition:5 * repetition + 5]) == [0, 1, 2, 3, 4]
    for batch in batches:
        scales = {item[2] for item in batch}
        assert len(scales) == 1 and 0.7 <= scales.pop() <= 1.3
    assert len({item[1] for batch in batches for item in batch}) == 15  # distinct item seeds


def test_resumed_sampler_yields_the_same_batches():
    whole = list(StepBatchSampler(7, 2, order="stream", seed=9, start_step=0, stop_step=8, per_batch_scale=True))
    tail = list(StepBatchSampler(7, 2, order="stream", seed=9, start_step=5, stop_step=8, per_batch_scale=True))
    assert tail == whole[5:]


def test_sampler_errors():
    with pytest.raises(ValueError, match="must be divisible by the number of processes 3"):
        StepBatchSampler(10, 4, order="epochs", seed=0, start_step=0, stop_step=1, world_size=3)
    with pytest.raises(ValueError, match="fewer than one batch of 4"):
        StepBatchSampler(3, 4, order="epochs", seed=0, start_step=0, stop_step=1)
    with pytest.raises(ValueError, match="unknown batch order 'random'"):
        StepBatchSampler(3, 1, order="random", seed=0, start_step=0, stop_step=1)


def test_position_seeded_items_do_not_depend_on_fetch_order(voc_root):
    dataset = PositionSeededDataset(TrainDatasetScaled(voc_root, crop_size=48))
    first, second = (0, 111, 0.9), (1, 222, 1.2)
    a = [dataset[first], dataset[second]]
    b = [dataset[second], dataset[first]]
    np.testing.assert_array_equal(a[0]["image"], b[1]["image"])
    np.testing.assert_array_equal(a[1]["original"], b[0]["original"])
    reseeded = [dataset[(0, seed, 0.9)]["image"] for seed in (5, 6, 7)]
    assert any(not np.array_equal(a[0]["image"], image) for image in reseeded)


# ---- checkpoints ----------------------------------------------------------------------------

def test_rng_state_round_trip_through_a_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    path = str(tmp_path / "rng.pt")
    atomic_save(capture_rng_state(), path)
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    restore_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected
    assert os.listdir(tmp_path) == ["rng.pt"]  # the temporary file was renamed away


def test_weight_files_have_released_names_without_module_prefix(tmp_path):
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1))
    save_model_weights(torch.nn.DataParallel(net), str(tmp_path / "w.pth"))
    state = torch.load(tmp_path / "w.pth", weights_only=True)
    assert sorted(state) == ["0.bias", "0.weight"]


def test_resume_loader_rejects_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found: .*nothing.pt"):
        load_resume_checkpoint(str(tmp_path / "nothing.pt"))
    torch.save({"fc8.weight": torch.zeros(1)}, tmp_path / "weights.pth")
    with pytest.raises(ValueError, match="weights.pth is not a resume checkpoint"):
        load_resume_checkpoint(str(tmp_path / "weights.pth"))


# ---- CAM -> pseudo label --------------------------------------------------------------------

def test_mine_pseudo_labels_matches_the_released_per_image_computation():
    rng = np.random.default_rng(0)
    cam = torch.from_numpy(rng.random((2, 20, 6, 8), dtype=np.float32) * 3)
    labels = torch.zeros(2, 20)
    labels[0, [2, 7]] = 1
    labels[1, 14] = 1
    originals = torch.from_numpy(rng.integers(0, 256, (2, 3, 48, 64), dtype=np.uint8))
    got = mine_pseudo_labels(cam, labels, originals, ReliableRegionMiner(0))
    for i in range(2):
        # OpenCV's bilinear resize uses the same half-pixel centres as align_corners=False.
        up = np.stack([cv2.resize(c, (64, 48), interpolation=cv2.INTER_LINEAR) for c in cam[i].numpy()])
        up = up * labels[i].numpy()[:, None, None]
        norm_cam = up / (up.max(axis=(1, 2), keepdims=True) + 1e-5)
        image = originals[i].numpy().transpose(1, 2, 0).copy()
        expected = mine_reliable_regions(image, labels[i].numpy(), norm_cam)
        np.testing.assert_array_equal(got[i], expected)
    assert set(np.unique(got)) <= {0, 3, 8, 15, 255}


# ---- one trainer ----------------------------------------------------------------------------

# The attention variant's seg heads train at x1 lr (only fc8 is from scratch): it moves slower.
@pytest.mark.parametrize("network, ratio", [("network.RRM", 0.7), ("network.RRM(attention)", 0.98)])
def test_loss_goes_down_on_a_fixed_batch(voc_root, tmp_path, network, ratio):
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--network", network,
                                   "--lr", "0.05", "--seed", "4"))
    trainer = Trainer(args, setup_runtime(args), max_step=1000)
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0)
    items = [dataset[(i, 1.0)] for i in range(2)]
    batch = torch.utils.data.default_collate(items)
    totals = [trainer.step(batch, t).terms["total"] for t in range(20)]
    trainer.close()
    # Medians: the CE jumps when a pseudo label gains its first background or foreground pixel.
    assert np.median(totals[-5:]) < ratio * np.median(totals[:5]), totals


def test_stage_timings_cover_every_stage(voc_root, tmp_path):
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path))
    trainer = Trainer(args, setup_runtime(args), max_step=10)
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0)
    batch = torch.utils.data.default_collate([dataset[(i, 1.0)] for i in range(2)])
    result = trainer.step(batch, 0, timed=True)
    trainer.close()
    assert set(result.timings) == {"forward", "mining", "losses", "backward", "step"}
    assert set(result.cpu_timings) == set(result.timings) and all(v >= 0 for v in result.cpu_timings.values())
    assert set(result.terms) == {"cls", "ce", "dense", "total"}


# ---- errors before any work -----------------------------------------------------------------

@pytest.mark.parametrize("what", ["weights", "train_list", "cls_labels", "voc12_root"])
def test_missing_inputs_are_named_before_any_work(voc_root, tmp_path, what):
    save_dir = tmp_path / "out"
    missing = str(tmp_path / f"missing_{what}")
    args = tiny_args(train_from_init, voc_root, save_dir, "--max_step", "2", f"--{what}", missing)
    with pytest.raises(FileNotFoundError, match=f"not found: {missing}"):
        run_training(args)
    assert not save_dir.exists()


def test_weights_that_do_not_fit_give_the_loader_message(voc_root, tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"not_a_layer.weight": torch.zeros(1)}, bad)
    args = tiny_args(train_from_cls_weight, voc_root, tmp_path / "out", "--max_step", "1", "--weights", str(bad))
    with pytest.raises(ValueError, match="bad.pth does not fit .*unexpected keys: \\['not_a_layer.weight'\\]"):
        run_training(args)


def test_flag_errors(voc_root, tmp_path):
    with pytest.raises(ValueError, match="--amp fp16 needs a GPU"):
        run_training(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "2", "--amp", "fp16"))
    with pytest.raises(ValueError, match="unknown network 'network.FCN'"):
        finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--network", "network.FCN"))
    with pytest.raises(ValueError, match="--IMpath /elsewhere/JPEGImages is not <voc12_root>/JPEGImages"):
        finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--IMpath", "/elsewhere/JPEGImages"))
    with pytest.raises(ValueError, match="--batch_size must be >= 1, got 0"):
        finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--batch_size", "0"))


def test_cls_steps_seg_lr_and_dropout_scale_reach_the_trainer(voc_root, tmp_path):
    args = finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "10", "--cls_steps", "7",
                                   "--seg_lr", "0.003", "--lr", "0.02", "--dropout_scale", "0"))
    trainer = Trainer(args, setup_runtime(args), max_step=10)
    trainer.close()
    # phase 1: poly over 7 updates from the 4 group lrs; phase 2 from 0.003 over the other 3
    assert trainer.schedule.lrs_at(3)[0] == pytest.approx(0.02 * (4 / 7) ** 0.9)
    assert trainer.schedule.lrs_at(8) == pytest.approx([0.003 * (2 / 3) ** 0.9] * 4)
    assert [trainer.schedule.classification_only(t) for t in (7, 8)] == [True, False]
    probabilities = [m.p for m in trainer.model.modules() if isinstance(m, (torch.nn.Dropout, torch.nn.Dropout2d))]
    assert len(probabilities) == 5 and probabilities == [0.0] * 5
    released = Trainer(finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "10")),
                       setup_runtime(args), max_step=10)
    released.close()
    assert sorted(m.p for m in released.model.modules() if isinstance(m, torch.nn.Dropout2d)) == [0.3, 0.3, 0.5, 0.5, 0.5]
    with pytest.raises(ValueError, match="--dropout_scale must be in \\[0, 1\\], got 2.0"):
        finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "2", "--dropout_scale", "2"))
    with pytest.raises(ValueError, match="--cls_steps needs the two_phase schedule"):
        finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--max_step", "2", "--cls_steps", "1"))


def test_adam_and_trainable_batchnorm_flags_reach_the_trainer_and_the_resume_check(voc_root, tmp_path):
    args = finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "2", "--optimizer", "adam",
                                   "--train_bn", "--lr", "0.001", "--session_name", "adam_"))
    trainer = Trainer(args, setup_runtime(args), max_step=2)
    trainer.close()
    assert isinstance(trainer.optimizer, torch.optim.AdamW)
    batchnorms = [m for m in trainer.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(m.training and m.weight.requires_grad for m in batchnorms)
    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert all(id(m.weight) in optimized and id(m.bias) in optimized for m in batchnorms)
    released = Trainer(finalize_args(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "2")),
                       setup_runtime(args), max_step=2)
    released.close()
    assert type(released.optimizer) is torch.optim.SGD
    assert all(not m.training for m in released.model.modules() if isinstance(m, torch.nn.BatchNorm2d))
    result = run_training(args, stop_after=1)
    with pytest.raises(ValueError, match="optimizer: checkpoint 'adam' vs now 'sgd'; train_bn: checkpoint True vs now False"):
        run_training(tiny_args(train_from_init, voc_root, tmp_path, "--max_step", "2", "--lr", "0.001",
                               "--session_name", "adam_", "--resume", result.resume_checkpoint))
