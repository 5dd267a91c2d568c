"""Flags that would be ignored are errors; --gpu_id, worker counts and pools as a user's machine needs."""
import os

import pytest
import torch

import train_from_cls_weight
import train_from_init
from tool import crf_pool, device, engine, mining
from tool.engine import build_parser, build_dataset, finalize_args, setup_runtime
from tool.schedule import SECOND_PHASE_LR


def parsed(script, *argv: str):
    return finalize_args(build_parser(script.DEFAULTS).parse_args(["--max_step", "2", *argv]))


def test_seg_lr_only_with_the_two_phase_schedule():
    assert parsed(train_from_init).seg_lr == SECOND_PHASE_LR
    assert parsed(train_from_init, "--seg_lr", "0.001").seg_lr == 0.001
    assert parsed(train_from_cls_weight).seg_lr is None
    with pytest.raises(ValueError, match="--seg_lr needs the two_phase schedule"):
        parsed(train_from_cls_weight, "--seg_lr", "0.001")


def test_momentum_only_with_sgd():
    assert parsed(train_from_init, "--momentum", "0.9").momentum == 0.9
    with pytest.raises(ValueError, match="--momentum applies to --optimizer sgd only, not adam"):
        parsed(train_from_init, "--optimizer", "adam", "--momentum", "0.9")


def test_random_resize_is_a_flag_of_the_init_augmentation(voc_root):
    args = parsed(train_from_init, "--voc12_root", voc_root, "--random_resize")
    assert build_dataset(args).apply_random_resize
    assert not build_dataset(parsed(train_from_init, "--voc12_root", voc_root)).apply_random_resize
    with pytest.raises(ValueError, match="--random_resize applies to the init augmentation"):
        parsed(train_from_cls_weight, "--random_resize")


def test_no_script_sets_gpu_id_by_default():
    assert parsed(train_from_init).gpu_id is None and parsed(train_from_cls_weight).gpu_id is None


def test_visible_devices_untouched_without_gpu_id(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    setup_runtime(parsed(train_from_cls_weight, "--device", "cpu"))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"


def test_gpu_id_is_an_error_under_torchrun_or_without_cuda(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="--gpu_id 1: no CUDA device is visible"):
        setup_runtime(parsed(train_from_cls_weight, "--gpu_id", "1"))
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="--gpu_id cannot be used under torchrun"):
        setup_runtime(parsed(train_from_cls_weight, "--gpu_id", "1"))


@pytest.mark.parametrize("previous", [None, "3"])
def test_gpu_id_is_visible_while_cuda_starts_and_restored_after(monkeypatch, previous):
    if previous is None:
        monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    else:
        monkeypatch.setenv("CUDA_VISIBLE_DEVICES", previous)
    seen = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "init", lambda: seen.append(os.environ.get("CUDA_VISIBLE_DEVICES")))
    engine.apply_gpu_id("1", launched_by_torchrun=False)
    assert seen == ["1"]
    assert os.environ.get("CUDA_VISIBLE_DEVICES") == previous


def test_gpu_id_after_cuda_started_is_an_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    with pytest.raises(ValueError, match="CUDA is already initialised in this process.*--device cuda:N"):
        engine.apply_gpu_id("1", launched_by_torchrun=False)


def test_usable_cores_follow_affinity_and_cgroup_quota(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    quota = tmp_path / "cpu.max"
    quota.write_text("max 100000\n")
    assert device.usable_cpu_count(str(quota)) == 6
    quota.write_text("250000 100000\n")
    assert device.usable_cpu_count(str(quota)) == 3
    assert device.usable_cpu_count(str(tmp_path / "absent")) == 6


def test_workers_default_to_this_process_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(device, "usable_cpu_count", lambda: 12)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert device.cores_per_process() == 3
    monkeypatch.setattr(engine, "cores_per_process", device.cores_per_process)
    assert parsed(train_from_cls_weight).num_workers == 3  # released 16, capped
    assert parsed(train_from_cls_weight, "--num_workers", "7").num_workers == 7  # explicit wins
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert parsed(train_from_init).num_workers == 12  # released 32, capped by 12 cores
    monkeypatch.setattr(mining, "cores_per_process", lambda: 1)
    miner = mining.ReliableRegionMiner()
    try:
        assert miner.workers == 1
    finally:
        miner.close()


def test_crf_pool_never_forks_the_initialised_parent():
    assert crf_pool._start_context().get_start_method() in ("forkserver", "spawn")

