"""One --device / --amp vocabulary for training and inference (tool/device.py)."""
import argparse

import pytest
import torch

import infer_RRM
import train_from_init
from tool import allocator
from tool.device import add_device_arguments, autocast_context, pick_device, resolve_amp
from tool.engine import Trainer, build_parser, finalize_args, setup_runtime


def test_resolve_amp_rule():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert [resolve_amp(mode, cpu) for mode in ("none", "bf16", "auto")] == ["none", "bf16", "bf16"]
    assert [resolve_amp(mode, cuda) for mode in ("none", "bf16", "fp16", "auto")] == ["none", "bf16", "fp16", "fp16"]
    with pytest.raises(ValueError, match=r"--amp fp16 needs a GPU \(use --amp bf16 on CPU\)"):
        resolve_amp("fp16", cpu)
    with pytest.raises(ValueError, match="--amp 'fp8': expected one of none, bf16, fp16"):
        resolve_amp("fp8", cpu)


def test_autocast_context_dtype_on_cpu():
    x = torch.ones(2, 2)
    with autocast_context("none", x.device):
        assert (x @ x).dtype == torch.float32
    for mode in ("bf16", "auto"):
        with autocast_context(mode, x.device):
            assert (x @ x).dtype == torch.bfloat16


@pytest.mark.parametrize("argv, expected", [([], "none"), (["--amp"], "auto"), (["--amp", "bf16"], "bf16"),
                                            (["--amp", "fp16"], "fp16")])
def test_training_and_inference_parse_amp_alike(argv, expected):
    training = build_parser(train_from_init.DEFAULTS).parse_args(argv)
    inference = infer_RRM.build_parser().parse_args(argv)
    assert training.amp == inference.amp == expected
    assert training.device == inference.device == "auto"


def test_amp_flag_rejects_unknown_mode(capsys):
    parser = argparse.ArgumentParser()
    add_device_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--amp", "fp8"])
    assert "argument --amp: invalid choice: 'fp8'" in capsys.readouterr().err
    without_amp = argparse.ArgumentParser()
    add_device_arguments(without_amp, amp=False)
    assert vars(without_amp.parse_args([])) == {"device": "auto"}


def test_pick_device():
    assert pick_device("cpu") == torch.device("cpu")
    assert pick_device("auto") == torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(ValueError, match="--device 'gpu0': not a device name"):
        pick_device("gpu0")
    if torch.cuda.is_available():
        assert pick_device("cuda:0") == torch.device("cuda", 0)
    else:
        with pytest.raises(ValueError, match="--device cuda:0: CUDA is not available on this machine"):
            pick_device("cuda:0")


@pytest.mark.parametrize("extra, retained", [([], [True]), (["--release_memory"], [])])
def test_training_runtime_keeps_freed_memory_unless_asked(monkeypatch, extra, retained):
    calls = []
    monkeypatch.setattr(allocator, "retain_freed_memory", lambda: calls.append(True))
    setup_runtime(finalize_args(build_parser(train_from_init.DEFAULTS).parse_args(["--device", "cpu", *extra])))
    assert calls == retained


def test_bare_amp_in_training_on_cpu_is_bf16_without_grad_scaler():
    args = finalize_args(build_parser(train_from_init.DEFAULTS).parse_args(
        ["--amp", "--device", "cpu", "--weights", "none", "--width", "0.0625", "--mining_workers", "0",
         "--max_step", "2"]))
    runtime = setup_runtime(args)
    trainer = Trainer(args, runtime, max_step=2)
    trainer.close()
    assert runtime.device == torch.device("cpu") and trainer.grad_scaler is None
    with pytest.raises(ValueError, match="--amp fp16 needs a GPU"):
        setup_runtime(finalize_args(build_parser(train_from_init.DEFAULTS).parse_args(
            ["--amp", "fp16", "--device", "cpu", "--max_step", "2"])))
