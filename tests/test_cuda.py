"""The GPU path: a training step in each precision, DataParallel, inference equal to the CPU's.

Marked `cuda`: skipped (and reported so) where no CUDA device is visible.
"""
import pytest
import torch
from torch.utils.data import default_collate

import network
import train_from_cls_weight
from tool.engine import Trainer, build_parser, finalize_args, setup_runtime
from tool.inference import predict_probs
from voc12.data import TrainDatasetScaled

pytestmark = pytest.mark.cuda

WIDTH = 0.0625


def cuda_trainer(voc_root, *extra, backend="pydensecrf", network_name="network.RRM"):
    """A tiny CUDA trainer; backend 'pydensecrf' mines on the CPU in-process, 'torch' on the GPU."""
    mining = ["--mining_workers", "0"] if backend == "pydensecrf" else []
    argv = ["--voc12_root", voc_root, "--weights", "none", "--width", str(WIDTH), "--crop_size", "64",
            "--batch_size", "2", "--num_workers", "0", *mining, "--crf_backend", backend, "--device", "cuda:0",
            "--network", network_name, "--max_step", "4", *extra]
    args = finalize_args(build_parser(train_from_cls_weight.DEFAULTS).parse_args(argv))
    return Trainer(args, setup_runtime(args), max_step=4)


def batch_of(voc_root):
    # With the ground truth: the joint steps also count the reliable-region quality (--region_quality).
    dataset = TrainDatasetScaled(voc_root, crop_size=64, seed=0, load_gt=True)
    return default_collate([dataset[(i, 1.0)] for i in range(2)])


@pytest.mark.parametrize("backend", ["pydensecrf", "torch"])
@pytest.mark.parametrize("amp", ["none", "bf16", "fp16"])
def test_training_step_on_cuda(voc_root, amp, backend):
    trainer = cuda_trainer(voc_root, "--amp", amp, backend=backend)
    try:
        assert (trainer.grad_scaler is not None) == (amp == "fp16")
        before = [p.detach().clone() for p in trainer.model.parameters()]
        for t in range(2):  # the scaler may skip its first step while it calibrates
            result = trainer.step(batch_of(voc_root), t)
            assert all(torch.isfinite(torch.tensor(v)) for v in result.terms.values()), result.terms
            assert set(result.quality) == {"", "cam_"} and 0 <= int(result.quality[""].kept) <= int(
                result.quality[""].valid) and int(result.quality[""].valid) > 0
        changed = [not torch.equal(a, b.detach()) for a, b in zip(before, trainer.model.parameters())]
        assert sum(changed) > len(changed) // 2
        assert all(p.device.type == "cuda" for p in trainer.model.parameters())
    finally:
        trainer.close()


def test_data_parallel_gathers_outputs_on_the_first_gpu():
    if torch.cuda.device_count() < 2:
        pytest.skip("DataParallel needs two GPUs")
    torch.manual_seed(0)
    model = network.build_segnet("network.RRM", WIDTH).cuda()
    parallel = torch.nn.DataParallel(model)
    images = torch.randn(4, 3, 48, 48, device="cuda")
    logits, cam, seg = parallel(images)
    assert logits.shape[0] == cam.shape[0] == seg[0].shape[0] == 4
    assert logits.device == torch.device("cuda", 0)
    torch.testing.assert_close(cam, model(images)[1], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("name", ["network.RRM", "network.RRM(attention)"])
def test_inference_on_cuda_equals_cpu(name):
    torch.manual_seed(0)
    model = network.build_segnet(name, WIDTH).eval()
    image = torch.randn(1, 3, 64, 80)
    with torch.no_grad():
        cpu_logits = model.predict_seg(image)
        gpu_logits = model.cuda().predict_seg(image.cuda()).cpu()
    assert (gpu_logits - cpu_logits).abs().max() <= 1e-3 * cpu_logits.abs().max()
    cpu_labels = predict_probs(model.cpu(), image).argmax(0)
    gpu_labels = predict_probs(model.cuda(), image.cuda()).argmax(0).cpu()
    assert (cpu_labels == gpu_labels).float().mean() >= 0.999


@pytest.mark.parametrize("network_name", ["network.RRM", "network.RRM(attention)"])
def test_a_torch_backend_step_never_waits_on_the_device(voc_root, network_name):
    # Mining (CAM upsampling, both CRFs, thresholds), the region-quality counts of the mined and the
    # CAM labels, the losses (dense energy included), backward and the optimiser step under "error":
    # any synchronising call raises. Only the logging point of `step` (outside `update`) reads them.
    trainer = cuda_trainer(voc_root, backend="torch", network_name=network_name)
    try:
        batch = batch_of(voc_root)
        trainer.step(batch, 0)  # first step: lazy CUDA/cuDNN initialisation may synchronise
        torch.cuda.set_sync_debug_mode("error")
        try:
            with pytest.raises(RuntimeError):
                torch.ones(1, device="cuda").item()  # the mode is really on
            result = trainer.update(batch, 1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert set(result.terms) == {"cls", "ce", "dense", "total"} | ({"bcd"} if "attention" in network_name else set())
        assert all(value.device.type == "cuda" for value in result.terms.values())
        assert all(torch.isfinite(value).item() for value in result.terms.values())
        assert set(result.quality) == {"", "cam_"}
        assert all(counts.as_vector().device.type == "cuda" for counts in result.quality.values())
    finally:
        trainer.close()


def test_torch_backend_training_step_on_cuda_equals_the_cpu_released_path(voc_root):
    batch = batch_of(voc_root)
    terms = {}
    for backend in ("pydensecrf", "torch"):
        trainer = cuda_trainer(voc_root, "--seed", "3", backend=backend)
        try:
            terms[backend] = trainer.step(batch, 0).terms
        finally:
            trainer.close()
    for name, value in terms["pydensecrf"].items():
        assert terms["torch"][name] == pytest.approx(value, rel=1e-3), name
