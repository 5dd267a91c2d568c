"""Training engine pieces: step-indexed batches, checkpoints, CAM -> pseudo label, one Trainer, errors."""
import json
import os
import random
from copy import deepcopy as copy_module

import cv2
import numpy as np
import pytest
import torch

import train_from_cls_weight
import train_from_init
from network import build_segnet
from tool.checkpoint import (atomic_save, capture_rng_state, load_resume_checkpoint, restore_rng_state,
                             save_model_weights)
from tool.cli import run_cli
from tool.dense_energy import DenseEnergyLoss
from tool.engine import RunLog, Trainer, build_parser, finalize_args, run_training, setup_runtime
from tool.losses import bcd_loss, classification_loss, split_cross_entropy
from tool.mining import ReliableRegionMiner, mine_pseudo_labels
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


def tiny_args_without_mining_workers(root, save_dir, *extra):
    """tiny_args of train_from_cls_weight, leaving --mining_workers at its default (the torch backend's)."""
    argv = tiny_argv(root, save_dir, *extra)
    at = argv.index("--mining_workers")
    return finalize_args(build_parser(train_from_cls_weight.DEFAULTS).parse_args(argv[:at] + argv[at + 2:]))


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

def test_mine_pseudo_labels_hands_the_miner_the_released_per_image_inputs():
    # Mining itself is checked against the released outputs (test_mining.py); here only what the
    # engine feeds it: the CAM resized as OpenCV does (half-pixel centres = align_corners False),
    # absent classes zeroed, each map over (its max + 1e-5), and the uint8 HWC crops.
    rng = np.random.default_rng(0)
    cam = torch.from_numpy(rng.random((2, 20, 6, 8), dtype=np.float32) * 3)
    labels = torch.zeros(2, 20)
    labels[0, [2, 7]] = 1
    labels[1, 14] = 1
    originals = torch.from_numpy(rng.integers(0, 256, (2, 3, 48, 64), dtype=np.uint8))
    seen = {}

    def miner(images, labels_np, norm_cams):
        seen.update(images=images, labels=labels_np, norm_cams=norm_cams)
        return np.full(images.shape[:3], 7, np.uint8)

    assert (mine_pseudo_labels(cam, labels, originals, miner) == 7).all()
    for i in range(2):
        up = np.stack([cv2.resize(c, (64, 48), interpolation=cv2.INTER_LINEAR) for c in cam[i].numpy()])
        up = up * labels[i].numpy()[:, None, None]
        np.testing.assert_allclose(seen["norm_cams"][i], up / (up.max(axis=(1, 2), keepdims=True) + 1e-5),
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(seen["images"][i], originals[i].numpy().transpose(1, 2, 0))
    assert seen["images"].dtype == np.uint8 and seen["images"].flags.c_contiguous
    np.testing.assert_array_equal(seen["labels"], labels.numpy())


def test_torch_backend_mines_the_labels_of_the_pydensecrf_path(voc_root):
    # A tiny random network's CAMs on the synthetic crops: mining on the tensors' device (here the
    # CPU) with the torch CRF against the pydensecrf miner; the CRFs agree to ~1e-5, the labels
    # on at least 99.9% of pixels.
    torch.manual_seed(1)
    model = build_segnet("network.RRM", 0.0625).eval()
    dataset = TrainDatasetScaled(voc_root, crop_size=96, seed=3)
    batch = torch.utils.data.default_collate([dataset[(i, 1.0)] for i in range(4)])
    with torch.no_grad():
        cam = model(batch["image"])[1]
    expected = mine_pseudo_labels(cam, batch["label"], batch["original"], ReliableRegionMiner(0))
    mined = mine_pseudo_labels(cam, batch["label"], batch["original"], None)
    assert isinstance(mined, torch.Tensor) and mined.dtype == torch.int64
    assert len(np.unique(expected)) >= 3
    assert (mined.numpy() == expected).mean() >= 0.999


def test_crf_backend_flag_resolution_and_the_flags_it_makes_meaningless(voc_root, tmp_path):
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path))
    auto = Trainer(args, setup_runtime(args), 10)
    assert auto.crf_backend == "pydensecrf" and auto.miner is not None  # auto on the CPU: the released path
    auto.close()
    args = tiny_args_without_mining_workers(voc_root, tmp_path, "--crf_backend", "torch")
    trainer = Trainer(args, setup_runtime(args), 10)
    assert trainer.crf_backend == "torch" and trainer.miner is None and trainer.dense_energy.backend == "torch"
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--crf_backend", "torch"))
    with pytest.raises(ValueError, match="--mining_workers applies to --crf_backend pydensecrf"):
        Trainer(args, setup_runtime(args), 10)
    with pytest.raises(SystemExit):
        tiny_args(train_from_cls_weight, voc_root, tmp_path, "--crf_backend", "cuda")


def test_a_step_with_the_torch_backend_equals_the_released_path(voc_root, tmp_path):
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0)
    batch = torch.utils.data.default_collate([dataset[(i, 1.0)] for i in range(2)])
    terms = {}
    for backend in ("pydensecrf", "torch"):
        args = tiny_args_without_mining_workers(voc_root, tmp_path, "--crf_backend", backend, "--seed", "2")
        trainer = Trainer(args, setup_runtime(args), max_step=100)
        terms[backend] = [trainer.step(batch, t).terms for t in range(2)]
        trainer.close()
    for released, ours in zip(terms["pydensecrf"], terms["torch"]):
        assert set(released) == set(ours) == {"cls", "ce", "dense", "total"}
        for name in released:
            assert ours[name] == pytest.approx(released[name], rel=1e-4), name


# ---- one trainer ----------------------------------------------------------------------------

# The attention variant's seg heads train at x1 lr (only fc8 is from scratch): it moves slower.
@pytest.mark.parametrize("network, ratio", [("network.RRM", 0.75), ("network.RRM(attention)", 0.93)])
def test_segmentation_loss_goes_down_on_a_fixed_batch(voc_root, tmp_path, network, ratio):
    args = finalize_args(tiny_args(train_from_cls_weight, voc_root, tmp_path, "--network", network,
                                   "--lr", "0.05", "--seed", "4"))
    trainer = Trainer(args, setup_runtime(args), max_step=1000)
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0)
    batch = torch.utils.data.default_collate([dataset[(i, 1.0)] for i in range(2)])
    ce = [trainer.step(batch, t).terms["ce"] for t in range(30)]
    trainer.close()
    # Medians: the CE jumps when a pseudo label gains its first background or foreground pixel.
    # Measured 3.06 -> 1.68 (RRM) and 3.03 -> 2.65 (attention).
    assert np.median(ce[-5:]) < ratio * np.median(ce[:5]), ce


# The parameters each loss term must reach, and which must not matter to it.
BRANCHES = {"cls": ["fc8"], "ce": ["fc8_seg_conv1", "fc8_seg_conv2"], "dense": ["fc8_seg_conv2"],
            "bcd": ["fc8_seg_conv1", "GAU_w3"]}  # BCD's features: old (conv1) and new (attention, value)
ATTENTION_HEAD = ["GAU_w1", "GAU_w2", "GAU_w3", "fc8_seg_conv3", "fc8_seg_conv4"]


def loss_terms(model, batch, pseudo_label) -> dict:
    logits, _cam, seg, *feature = model(batch["image"])
    seg = seg[0] if isinstance(seg, (list, tuple)) else seg
    up = torch.nn.functional.interpolate(seg, size=pseudo_label.shape[-2:], mode="bilinear", align_corners=False)
    dense = DenseEnergyLoss(weight=1e-7, sigma_rgb=15.0, sigma_xy=100.0, scale_factor=0.5)
    terms = {"cls": classification_loss(logits, batch["label"]), "ce": split_cross_entropy(up, pseudo_label),
             "dense": dense(batch["original"].float(), torch.softmax(up, 1), batch["roi"].float(), pseudo_label)}
    if feature:
        terms["bcd"] = bcd_loss(seg, feature[0])
    return terms


@pytest.mark.parametrize("network", ["network.RRM", "network.RRM(attention)"])
def test_every_term_reaches_its_branch_and_falls_under_its_own_gradient(voc_root, network):
    torch.manual_seed(0)
    model = build_segnet(network, 0.0625).eval()  # no dropout: each term a deterministic function
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0)
    batch = torch.utils.data.default_collate([dataset[(i, 1.0)] for i in range(2)])
    with torch.no_grad():
        cam = model(batch["image"])[1]
    pseudo_label = torch.from_numpy(mine_pseudo_labels(cam, batch["label"], batch["original"],
                                                        ReliableRegionMiner(0))).long()
    assert ((pseudo_label != 255).sum() > 0) and (pseudo_label == 0).any()
    attention = network.endswith("(attention)")
    terms = loss_terms(model, batch, pseudo_label)
    assert sorted(terms) == sorted(["cls", "ce", "dense"] + (["bcd"] if attention else []))
    for name, term in terms.items():
        reached = BRANCHES[name] + (["fc8_seg_conv4"] if attention and name in ("ce", "dense") else [])
        grads = torch.autograd.grad(term, [getattr(model, layer).weight for layer in reached], retain_graph=True,
                                    allow_unused=True)
        assert all(g is not None and g.abs().sum() > 0 for g in grads), (name, reached)
    if attention:  # the attention head reaches the segmentation loss
        grads = torch.autograd.grad(terms["ce"], [getattr(model, layer).weight for layer in ATTENTION_HEAD])
        assert all(g.abs().sum() > 0 for g in grads)
    # Plain gradient steps on one term alone lower it at every step (BCD: by ~1e-5 a step). Not the
    # dense energy: its released gradient holds the gate constant, so it is not the value's gradient.
    for name in [name for name in terms if name != "dense"]:
        copy = copy_module(model)
        optimizer = torch.optim.SGD(copy.parameters(), lr=1.0 if name == "bcd" else 0.05)
        values = []
        for _ in range(5):
            term = loss_terms(copy, batch, pseudo_label)[name]
            optimizer.zero_grad()
            term.backward()
            optimizer.step()
            values.append(term.item())
        assert all(later < earlier for earlier, later in zip(values, values[1:])), (name, values)


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


# ---- resume: exact continuation, refused changes, logs, cleanup, error lines -----------------

def assert_identical(a, b, where="checkpoint"):
    """Exact equality of nested checkpoint content: tensors bit for bit (and dtype), values by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert list(a) == list(b), where
        for key in a:
            assert_identical(a[key], b[key], f"{where}[{key!r}]")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_identical(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


def crash_at(monkeypatch, step, error):
    real_step = Trainer.step

    def step_or_crash(self, batch, t, timed=False):
        if t == step:
            raise error
        return real_step(self, batch, t, timed)

    monkeypatch.setattr(Trainer, "step", step_or_crash)


def read_logs(save_dir, session):
    with open(os.path.join(save_dir, f"{session}metrics.jsonl")) as handle:
        metrics = [json.loads(line) for line in handle]
    with open(os.path.join(save_dir, f"{session}.log")) as handle:
        iters = [int(line[5:10]) for line in handle if line.startswith("Iter:")]
    return [{k: v for k, v in record.items() if k != "time"} for record in metrics], iters


@pytest.mark.parametrize("script", [train_from_init, train_from_cls_weight])
def test_a_crashed_and_resumed_run_equals_the_uninterrupted_one_bit_for_bit(voc_root, tmp_path, monkeypatch,
                                                                            script):
    argv = ["--max_step", "4", "--seed", "7", "--log_every", "1", "--save_every", "2", "--session_name", "s_"]
    straight_dir, split_dir = tmp_path / "straight", tmp_path / "split"
    straight = run_training(tiny_args(script, voc_root, straight_dir, *argv))
    # Killed during update 3: the last checkpoint is at 2, the logs already hold update 2.
    crash_at(monkeypatch, 3, RuntimeError("killed"))
    with pytest.raises(RuntimeError, match="killed"):
        run_training(tiny_args(script, voc_root, split_dir, *argv))
    monkeypatch.undo()
    assert load_resume_checkpoint(str(split_dir / "s_resume.pt"))["step"] == 2
    resumed = run_training(tiny_args(script, voc_root, split_dir, *argv, "--resume", str(split_dir / "s_resume.pt")))
    assert resumed.steps_done == straight.steps_done
    # Model, optimiser, every RNG state, data position, run settings: all equal, bit for bit.
    assert_identical(load_resume_checkpoint(straight.resume_checkpoint),
                     load_resume_checkpoint(resumed.resume_checkpoint))
    assert_identical(torch.load(straight.final_weights, weights_only=True),
                     torch.load(resumed.final_weights, weights_only=True))
    # Each update is logged once, with the same values as the uninterrupted run.
    straight_metrics, straight_iters = read_logs(straight_dir, "s_")
    resumed_metrics, resumed_iters = read_logs(split_dir, "s_")
    assert [r["step"] for r in resumed_metrics] == list(range(straight.steps_done))
    assert resumed_metrics == straight_metrics
    assert resumed_iters == straight_iters == list(range(straight.steps_done))


def test_resume_drops_only_the_redone_lines_of_the_interrupted_run(tmp_path):
    path = tmp_path / "s_.log"
    earlier_run = ["{}", "Iter:    0/    9 a", "Iter:    5/    9 a", "finished 10 updates; weights: x"]
    interrupted = ["{}", "Iter:    0/    9 b", "Iter:    2/    9 b", "{}", "Iter:    4/    9 b", "Iter:    6/    9 b"]
    path.write_text("\n".join(earlier_run + interrupted) + "\n")
    RunLog._drop_redone(str(path), 4, RunLog._text_step, keep_unstepped=True)
    assert path.read_text().splitlines() == earlier_run + interrupted[:4]
    metrics = tmp_path / "m.jsonl"
    metrics.write_text('{"step": 0}\n{"step": 1}\n{"step": 2}\n{"st')  # torn by the crash
    RunLog._drop_redone(str(metrics), 2, RunLog._metrics_step, keep_unstepped=False)
    assert metrics.read_text() == '{"step": 0}\n{"step": 1}\n'


def test_resume_refuses_every_weight_changing_flag_in_one_error_and_closes_the_trainer(voc_root, tmp_path,
                                                                                        monkeypatch):
    argv = ["--max_step", "3", "--session_name", "m_"]
    first = run_training(tiny_args(train_from_cls_weight, voc_root, tmp_path, *argv), stop_after=1)
    closed = []
    real_close = Trainer.close
    monkeypatch.setattr(Trainer, "close", lambda self: (closed.append(self), real_close(self)))
    changed = {"lr": "0.01", "wt_dec": "0.001", "momentum": "0.5", "densecrfloss": "0", "sigma-rgb": "10",
               "sigma-xy": "50", "rloss-scale": "0.25", "dropout_scale": "0.5", "width": "0.125", "amp": "bf16",
               "weights": "other.pth", "network": "network.RRM(attention)", "seed": "3", "crop_size": "48"}
    args = tiny_args(train_from_cls_weight, voc_root, tmp_path, *argv, "--resume", first.resume_checkpoint,
                     "--train_bn", *[item for flag, value in changed.items() for item in (f"--{flag}", value)])
    args.batch_order, args.augmentation, args.updates_past_max_step = "epochs", "init", 0  # the recipe's own
    with pytest.raises(ValueError, match="was written by a different run: ") as info:
        run_training(args)
    listed = {part.split(":")[0] for part in str(info.value).split("different run: ")[1].split("; ")}
    assert listed == {flag.replace("-", "_") for flag in changed} | {"train_bn", "batch_order", "augmentation",
                                                                     "updates_past_max_step"}
    assert "momentum: checkpoint None vs now 0.5" in str(info.value)
    assert len(closed) == 1  # the trainer (and its mining pool) built before the refusal was closed


def test_resume_accepts_flags_that_cannot_change_the_weights(voc_root, tmp_path):
    argv = ["--max_step", "3", "--session_name", "h_"]
    first = run_training(tiny_args(train_from_cls_weight, voc_root, tmp_path, *argv), stop_after=1)
    harmless = ["--log_every", "7", "--save_every", "5", "--no_progress", "--num_workers", "1", "--mining_workers",
                "1", "--release_memory", "--tensorboard", "--vis_every", "9", "--vis_images", "1",
                "--region_quality"] + ([] if torch.cuda.is_available() else ["--device", "auto"])
    resumed = run_training(tiny_args(train_from_cls_weight, voc_root, tmp_path, *argv, *harmless,
                                     "--resume", first.resume_checkpoint))
    assert resumed.steps_done == 4


def test_only_errors_before_training_become_one_line(voc_root, tmp_path, monkeypatch):
    argv = ["--max_step", "2", "--session_name", "e_"]
    first = run_training(tiny_args(train_from_init, voc_root, tmp_path, *argv), stop_after=1)
    with pytest.raises(SystemExit) as info:
        run_cli("train_from_init.py", run_training, tiny_args(train_from_init, voc_root, tmp_path, *argv, "--seed",
                                                              "1", "--resume", first.resume_checkpoint))
    assert info.value.code.startswith("train_from_init.py: error: --resume ") and "seed: checkpoint 0 vs now 1" in \
        info.value.code
    crash_at(monkeypatch, 0, ValueError("a bad value at update 0"))
    with pytest.raises(ValueError, match="a bad value at update 0"):  # the traceback stays
        run_cli("train_from_init.py", run_training, tiny_args(train_from_init, voc_root, tmp_path, *argv))
