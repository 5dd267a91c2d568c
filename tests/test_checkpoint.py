"""Checkpoint files: atomic writes (fsync, no temporary left on failure), resume checksums, weight sidecars."""
import hashlib
import os

import pytest
import torch

import tool.checkpoint as checkpoint
from tool.checkpoint import (atomic_save, load_resume_checkpoint, save_model_weights, save_resume_checkpoint,
                             verify_checksum_file)


def small_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))


def write_resume(path, model=None):
    model = model or small_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.rand(1, 3, 5, 5)).sum().backward()
    optimizer.step()
    save_resume_checkpoint(str(path), model=model, optimizer=optimizer, step=3, data_position={"step": 3},
                           run_config={"lr": 0.1, "network": "network.RRM", "cls_steps": None, "rng_per_rank": []})
    return model


def test_atomic_save_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(os.path.isdir(f"/proc/self/fd/{fd}")),
                                                 real_fsync(fd))[1])
    atomic_save({"a": torch.zeros(2)}, str(tmp_path / "x.pt"))
    assert synced == [False, True]  # the file, then the folder holding the rename
    assert os.listdir(tmp_path) == ["x.pt"]


@pytest.mark.parametrize("failing", ["write", "fsync"])
def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch, failing):
    path = str(tmp_path / "x.pt")
    atomic_save({"old": torch.ones(3)}, path)

    def half_write(obj, handle):
        handle.write(b"half a checkpoint")
        raise OSError("disk full")

    def no_fsync(fd):
        raise OSError("I/O error")

    if failing == "write":
        monkeypatch.setattr(torch, "save", half_write)
    else:
        monkeypatch.setattr(os, "fsync", no_fsync)
    with pytest.raises(OSError):
        atomic_save({"new": torch.zeros(3)}, path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["x.pt"]
    assert torch.equal(torch.load(path, weights_only=True)["old"], torch.ones(3))


def test_resume_checkpoint_round_trip_verifies_its_checksum(tmp_path):
    path = tmp_path / "resume.pt"
    model = write_resume(path)
    loaded = load_resume_checkpoint(str(path))
    assert "sha256" not in loaded and loaded["step"] == 3
    assert loaded["run_config"] == {"lr": 0.1, "network": "network.RRM", "cls_steps": None, "rng_per_rank": []}
    for name, value in model.state_dict().items():
        assert torch.equal(loaded["model"][name], value), name


def test_a_changed_value_is_refused_even_when_the_file_still_parses(tmp_path):
    path = tmp_path / "resume.pt"
    write_resume(path)
    stored = torch.load(path, weights_only=True)
    stored["model"]["0.weight"].view(-1).view(torch.uint8)[5] ^= 0x10  # one bit of one weight
    torch.save(stored, path)
    with pytest.raises(ValueError, match="--resume: .*resume.pt is corrupt: its content's SHA-256 .* does not match"):
        load_resume_checkpoint(str(path))
    stored = torch.load(path, weights_only=True)
    stored["run_config"]["lr"] = 0.2
    stored.pop("sha256")
    torch.save(stored, path)
    with pytest.raises(ValueError, match="resume.pt is corrupt: .* does not match the stored None"):
        load_resume_checkpoint(str(path))


def test_a_byte_flipped_file_is_refused_naming_it(tmp_path):
    model = small_model()
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(model[0].weight.numel(), dtype=torch.float32).view_as(model[0].weight))
    path = tmp_path / "resume.pt"
    write_resume(path, model)
    data = bytearray(path.read_bytes())
    # Bytes of the conv weight as saved (after the SGD step) sit in the file as they are: flip one.
    saved = torch.load(path, weights_only=True)["model"]["0.weight"]
    offset = bytes(data).find(saved.numpy().tobytes())
    assert offset > 0
    data[offset + 41] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"--resume: {path} is corrupt: its content's SHA-256"):
        load_resume_checkpoint(str(path))


def test_truncated_and_old_format_files_are_refused(tmp_path):
    path = tmp_path / "resume.pt"
    write_resume(path)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ValueError, match=f"--resume: {path} is corrupt or not a PyTorch checkpoint"):
        load_resume_checkpoint(str(path))
    torch.save({"format": "rrm-resume-v1", "model": {}}, path)
    with pytest.raises(ValueError, match="written by an older version of this trainer"):
        load_resume_checkpoint(str(path))


def test_weight_files_get_a_sha256sum_sidecar_that_is_verified(tmp_path):
    path = str(tmp_path / "w.pth")
    save_model_weights(small_model(), path)
    assert sorted(os.listdir(tmp_path)) == ["w.pth", "w.pth.sha256"]
    with open(path, "rb") as handle:
        expected = hashlib.sha256(handle.read()).hexdigest()
    assert (tmp_path / "w.pth.sha256").read_text() == f"{expected}  w.pth\n"  # `sha256sum -c` reads it
    verify_checksum_file(path)
    assert sorted(torch.load(path, weights_only=True)) == sorted(small_model().state_dict())  # still plain
    data = bytearray((tmp_path / "w.pth").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "w.pth").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path} is corrupt: its SHA-256 .* does not match {path}.sha256"):
        verify_checksum_file(path)
    (tmp_path / "w.pth.sha256").write_text("garbage\n")
    with pytest.raises(ValueError, match="w.pth.sha256 is not in sha256sum format"):
        verify_checksum_file(path)
    os.remove(tmp_path / "w.pth.sha256")
    verify_checksum_file(path)  # a released download has no sidecar


def test_rewriting_weights_removes_the_stale_sidecar_first(tmp_path, monkeypatch):
    path = str(tmp_path / "w.pth")
    save_model_weights(small_model(), path)

    def crash(text, target):
        raise OSError("killed before the sidecar")

    monkeypatch.setattr(checkpoint, "atomic_write_text", crash)
    model = small_model()
    with torch.no_grad():
        model[0].weight.add_(1)
    with pytest.raises(OSError):
        save_model_weights(model, path)
    assert os.listdir(tmp_path) == ["w.pth"]  # new weights, no stale sidecar to raise a false alarm
    verify_checksum_file(path)
