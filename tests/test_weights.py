"""tool/weights.py: MXNet .params reader, SPEC §2 name mapping, strict .pth/.params loading."""
from __future__ import annotations

import io
import logging
import os
import random
import struct
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from network import resnet38d, rrm, rrm_attention
from test_networks import expected_backbone_shapes
from tool.weights import (load_weights, mxnet_name_to_resnet38, mxnet_to_resnet38, read_mxnet_params,
                          read_state_dict)

SMALL = 0.0625
# Files written by real mxnet 1.9.1 (see data/mxnet/README.md), found from any working directory.
MXNET_DATA = Path(os.path.dirname(__file__)) / "data" / "mxnet"
MXNET_FIXTURES = {"dtypes": "dtypes_expected.npz", "np_style": "np_style_expected.npz",
                  "list": "list_expected.npz", "extra_sparse": "extra_sparse_expected_dense.npz"}
MAGICS = {"v1": 0xF993FAC8, "v2": 0xF993FAC9, "v3": 0xF993FACA}
DTYPE_FLAGS = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
               5: np.int8, 6: np.int64, 7: np.bool_}
MX_BN_FIELDS = {"weight": "gamma", "bias": "beta", "running_mean": "moving_mean", "running_var": "moving_var"}


def write_params(path: Path, named: dict[str, np.ndarray], layout: str, type_flags: list[int] | None = None,
                 storage_type: int = 0) -> Path:
    """A minimal MXNet `nd.save` writer for the four header layouts."""
    flag_of = {np.dtype(dtype): flag for flag, dtype in DTYPE_FLAGS.items()}
    out = struct.pack("<QQQ", 0x112, 0, len(named))
    for position, array in enumerate(named.values()):
        shape = array.shape
        if layout == "legacy":
            out += struct.pack(f"<I{len(shape)}I", len(shape), *shape)
        elif layout == "v1":
            out += struct.pack(f"<Ii{len(shape)}q", MAGICS["v1"], len(shape), *shape)
        else:
            out += struct.pack(f"<Iii{len(shape)}q", MAGICS[layout], storage_type, len(shape), *shape)
        if not shape and layout != "v3":
            continue  # ndim 0 before V3: an empty array, nothing follows
        flag = type_flags[position] if type_flags else flag_of[array.dtype]
        out += struct.pack("<iii", 1, 0, flag) + array.astype(array.dtype.newbyteorder("<")).tobytes()
    out += struct.pack("<Q", len(named))
    for name in named:
        out += struct.pack("<Q", len(name.encode())) + name.encode()
    path.write_bytes(out)
    return path


def sample_arrays(flag: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(flag)
    dtype = np.dtype(DTYPE_FLAGS[flag])
    values = rng.normal(0, 50, size=(2, 3, 4))
    if dtype == np.bool_:
        cube = values > 0
    else:
        cube = values.astype(dtype)
    return {"arg:res2a_branch1_weight": cube, "aux:bn7_moving_var": cube[0, 0].copy()}


@pytest.mark.parametrize("layout", ["legacy", "v1", "v2", "v3"])
@pytest.mark.parametrize("flag", sorted(DTYPE_FLAGS))
def test_reader_every_layout_and_dtype(tmp_path, layout, flag):
    arrays = sample_arrays(flag)
    loaded = read_mxnet_params(write_params(tmp_path / "w.params", arrays, layout))
    assert list(loaded) == list(arrays)
    for name, array in arrays.items():
        assert loaded[name].dtype == array.dtype and loaded[name].shape == array.shape
        np.testing.assert_array_equal(loaded[name], array)


def test_reader_v3_scalar_and_old_empty_arrays(tmp_path):
    scalar = {"arg:scale": np.array(2.5, np.float32), "arg:after": np.arange(3, dtype=np.int64)}
    loaded = read_mxnet_params(write_params(tmp_path / "s.params", scalar, "v3"))
    assert loaded["arg:scale"].shape == () and loaded["arg:scale"] == np.float32(2.5)
    np.testing.assert_array_equal(loaded["arg:after"], np.arange(3))
    for layout in ("legacy", "v1", "v2"):
        empty = {"arg:none": np.array(0.0, np.float32), "arg:after": np.arange(3, dtype=np.int32)}
        loaded = read_mxnet_params(write_params(tmp_path / f"{layout}.params", empty, layout))
        assert loaded["arg:none"].size == 0
        np.testing.assert_array_equal(loaded["arg:after"], np.arange(3))


def test_reader_errors_name_the_file(tmp_path):
    good = write_params(tmp_path / "good.params", sample_arrays(0), "v2").read_bytes()
    for cut in (len(good) - 3, 30, 12):
        truncated = tmp_path / f"cut{cut}.params"
        truncated.write_bytes(good[:cut])
        with pytest.raises(ValueError, match=rf"cut{cut}\.params: MXNet \.params file is truncated"):
            read_mxnet_params(truncated)
    foreign = tmp_path / "foreign.params"
    foreign.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    with pytest.raises(ValueError, match=r"foreign\.params: not an MXNet NDArray"):
        read_mxnet_params(foreign)
    garbage = tmp_path / "garbage.params"
    garbage.write_bytes(struct.pack("<QQQI", 0x112, 0, 1, 0x12345678) + bytes(40))
    with pytest.raises(ValueError, match=r"garbage\.params: array 0 starts with 0x12345678, neither"):
        read_mxnet_params(garbage)
    trailing = tmp_path / "trailing.params"
    trailing.write_bytes(good + b"junk")
    with pytest.raises(ValueError, match=r"trailing\.params: 4 unexpected bytes"):
        read_mxnet_params(trailing)
    with pytest.raises(FileNotFoundError, match=r"absent\.params"):
        read_mxnet_params(tmp_path / "absent.params")


def test_reader_rejects_unknown_dtype_storage_and_name_count(tmp_path):
    arrays = sample_arrays(0)
    with pytest.raises(ValueError, match=r"bad\.params: array 0 has unknown dtype flag 12"):
        read_mxnet_params(write_params(tmp_path / "bad.params", arrays, "v2", type_flags=[12, 0]))
    with pytest.raises(ValueError, match=r"storage\.params: array 0 has unknown storage type 3"):
        read_mxnet_params(write_params(tmp_path / "storage.params", arrays, "v2", storage_type=3))
    names = write_params(tmp_path / "names.params", arrays, "v1")
    data = names.read_bytes()
    first, second = arrays
    # Keep the first name only: 2 arrays, 1 name (0 names would be a valid list file).
    names.write_bytes(data[:-len(second) - len(first) - 24] + struct.pack("<QQ", 1, len(first)) + first.encode())
    with pytest.raises(ValueError, match=r"names\.params: MXNet \.params file has 2 arrays but 1 names"):
        read_mxnet_params(names)


@pytest.mark.parametrize("name", sorted(MXNET_FIXTURES))
def test_reader_matches_mxnet_written_files(name):
    loaded = read_mxnet_params(MXNET_DATA / f"{name}.params")
    with np.load(MXNET_DATA / MXNET_FIXTURES[name]) as expected_file:
        expected = {key: expected_file[key] for key in expected_file.files}
    assert list(loaded) == list(expected)
    for key, array in expected.items():
        assert (loaded[key].dtype, loaded[key].shape) == (array.dtype, array.shape), key
        assert loaded[key].tobytes() == array.tobytes(), key  # bit for bit: NaN payloads, -0.0
        if array.dtype.kind == "f":
            np.testing.assert_array_equal(np.isnan(loaded[key]), np.isnan(array))
    # The cases these files exist for are really in them, so the checks above are not vacuous.
    special = {"dtypes": lambda: np.isnan(loaded["aux:special_f32"]).sum() == 1,
               "np_style": lambda: loaded["arg:np_scalar0d_f32"].shape == (),
               "list": lambda: list(loaded) == [str(position) for position in range(6)],
               "extra_sparse": lambda: np.count_nonzero(loaded["arg:w_csr"]) == 3}
    assert special[name]()


# Offsets of index entries in extra_sparse.params: csr (storage type 2) first, then row_sparse (1).
CSR_FIRST_COLUMN = 24 + 4 + 4 + 12 + 20 + 8 + 4 + 2 * 16 + 3 * 4 + 5 * 8
RSP_LAST_ROW = 0xB8 + 4 + 4 + 20 + 20 + 8 + 4 + 16 + 15 * 4 + 2 * 8


@pytest.mark.parametrize("offset, value, reason", [
    (CSR_FIRST_COLUMN, 5, r"array 0 \(csr, shape \(4, 5\)\) is not a valid sparse array: column indices \[5, 3, 0\]"),
    (RSP_LAST_ROW, 4, r"array 1 \(row_sparse, shape \(4, 5\)\) is not a valid sparse array: row indices \[0, 2, 4\]"),
    (0x1C, 7, r"array 0 has unknown storage type 7"),
])
def test_reader_rejects_invalid_sparse_arrays(tmp_path, offset, value, reason):
    data = bytearray((MXNET_DATA / "extra_sparse.params").read_bytes())
    size = 4 if offset == 0x1C else 8
    assert int.from_bytes(data[offset:offset + size], "little") in (1, 2, 3)  # the entry the offset names
    data[offset:offset + size] = value.to_bytes(size, "little")
    (tmp_path / "sparse.params").write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"sparse\.params: " + reason):
        read_mxnet_params(tmp_path / "sparse.params")


def test_list_params_cannot_load_as_weights():
    with pytest.raises(ValueError, match=r"list\.params: MXNet \.params file was saved from a list and has "
                                         r"no parameter names"):
        load_weights(resnet38d.Net(width=SMALL), MXNET_DATA / "list.params")


def mxnet_names_of(torch_key: str) -> str:
    """The MXNet name of a backbone key, spelled out from the SPEC §2 conventions."""
    if torch_key == "conv1a.weight":
        return "arg:conv1a_weight"
    layer, field = torch_key.rsplit(".", 1)
    is_conv = ".conv_" in torch_key
    mx_field = field if is_conv else MX_BN_FIELDS[field]
    prefix = "aux:" if mx_field.startswith("moving") else "arg:"
    if layer == "bn7":
        return f"{prefix}bn7_{mx_field}"
    block, branch_layer = layer.split(".")
    stage, _, index = block[1:].partition("_")
    block_name = f"{stage}b{index}" if index else f"{stage}a"
    branch = branch_layer.split("_", 1)[1]
    return f"{prefix}{'res' if is_conv else 'bn'}{block_name}_{branch}_{mx_field}"


def backbone_keys() -> list[str]:
    return [key for key in expected_backbone_shapes() if not key.endswith("num_batches_tracked")]


def test_mapping_gives_every_backbone_tensor_exactly_once():
    names = {mxnet_names_of(key): key for key in backbone_keys()}
    assert "arg:res4b3_branch2a_weight" in names and "aux:bn5b2_branch2b1_moving_mean" in names
    assert names["arg:bn6a_branch2b2_gamma"] == "b6.bn_branch2b2.weight"
    params = {name: np.full((1,), position, np.float32) for position, name in enumerate(names)}
    params["arg:linear1000_weight"] = np.zeros((1000, 4096), np.float32)
    params["arg:linear1000_bias"] = np.zeros((1000,), np.float32)
    converted = mxnet_to_resnet38(params)
    assert sorted(converted) == sorted(backbone_keys())
    for position, (name, key) in enumerate(names.items()):
        assert converted[key].item() == position, name
        assert mxnet_name_to_resnet38(name.split(":")[1]) == key
    assert mxnet_name_to_resnet38("linear1000_bias") is None


def test_mapping_rejects_collisions_and_unknown_fields():
    with pytest.raises(ValueError, match=r"'arg:res2a_branch1_weight' and 'res2a_branch1_weight' both map"):
        mxnet_to_resnet38({"arg:res2a_branch1_weight": np.zeros(1), "res2a_branch1_weight": np.zeros(1)})
    with pytest.raises(ValueError, match=r"'aux:bn7_moving_std': unknown BatchNorm field 'std'"):
        mxnet_name_to_resnet38("aux:bn7_moving_std")


def random_state(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.rand(value.shape, generator=generator) + 0.5 if value.is_floating_point()
                  else torch.full_like(value, 7)) for key, value in model.state_dict().items()}


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    current = model.state_dict()
    for key, value in state.items():
        assert torch.equal(current[key], value), key


def messages(caplog) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "tool.weights"]


def write_backbone_params(tmp_path: Path, state: dict[str, torch.Tensor], layout: str = "v2") -> Path:
    named = {mxnet_names_of(key): value.numpy() for key, value in state.items()
             if not key.endswith("num_batches_tracked")}
    named["arg:linear1000_weight"] = np.ones((1000, 4), np.float32)
    return write_params(tmp_path / "ilsvrc.params", named, layout)


def test_params_load_into_backbone_and_rrm(tmp_path, caplog):
    source = random_state(resnet38d.Net(width=SMALL), seed=0)
    path = write_backbone_params(tmp_path, source)
    backbone = resnet38d.Net(width=SMALL)
    with caplog.at_level(logging.INFO, logger="tool.weights"):
        load_weights(backbone, path)
    assert_loaded(backbone, {k: v for k, v in source.items() if not k.endswith("num_batches_tracked")})
    assert messages(caplog) == []

    model = rrm.SegNet(width=SMALL)
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("fc8")}
    with caplog.at_level(logging.INFO, logger="tool.weights"):
        load_weights(model, path)
    assert_loaded(model, {**{k: v for k, v in source.items() if not k.endswith("num_batches_tracked")}, **heads})
    (line,) = messages(caplog)
    assert "ilsvrc.params: 5 parameters not in the file keep their initialisation: fc8, fc8_seg_conv1, fc8_seg_conv2" in line
    with pytest.raises(ValueError, match=r"ilsvrc\.params does not fit network\.rrm\.SegNet: missing keys: "
                                         r"\['fc8\.weight', 'fc8_seg_conv1\.bias'"):
        load_weights(rrm.SegNet(width=SMALL), path, allow_missing_heads=False)


@pytest.mark.parametrize("wrap", ["plain", "module", "state_dict", "model", "module_in_state_dict", "old_bn"])
def test_pth_variants_load(tmp_path, wrap):
    source = random_state(rrm.SegNet(width=SMALL), seed=1)
    stored = dict(source)
    if wrap in ("module", "module_in_state_dict"):
        stored = {f"module.{key}": value for key, value in stored.items()}
    if wrap == "old_bn":
        stored = {key: value for key, value in stored.items() if not key.endswith("num_batches_tracked")}
    checkpoint = {"state_dict": stored, "step": 3} if wrap in ("state_dict", "module_in_state_dict") else stored
    if wrap == "model":
        checkpoint = {"model": stored, "optimizer": {}}
    torch.save(checkpoint, tmp_path / "w.pth")
    model = rrm.SegNet(width=SMALL)
    load_weights(model, tmp_path / "w.pth", allow_missing_heads=False)
    assert_loaded(model, {k: v for k, v in source.items() if k in stored or wrap != "old_bn"})


@pytest.mark.parametrize("cls, absent", [
    (rrm.SegNet, "fc8_seg_conv1, fc8_seg_conv2"),
    (rrm_attention.SegNet, "GAU_w1, GAU_w2, GAU_w3, fc8_seg_conv1, fc8_seg_conv2, fc8_seg_conv3, fc8_seg_conv4"),
])
def test_classification_weights_leave_heads_initialised(tmp_path, caplog, cls, absent):
    classifier = {key: value for key, value in random_state(rrm.Net(width=SMALL), seed=2).items()
                  if not key.startswith("fc8_seg")}
    torch.save(classifier, tmp_path / "res38_cls.pth")
    model = cls(width=SMALL)
    heads = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("fc8_seg", "GAU"))}
    with caplog.at_level(logging.INFO, logger="tool.weights"):
        load_weights(model, tmp_path / "res38_cls.pth")
    assert_loaded(model, {**classifier, **heads})
    (line,) = messages(caplog)
    assert line.endswith(f"keep their initialisation: {absent}")
    with pytest.raises(ValueError, match=r"missing keys: \[.*'fc8_seg_conv1\.weight'"):
        load_weights(cls(width=SMALL), tmp_path / "res38_cls.pth", allow_missing_heads=False)


def test_pth_errors_list_keys(tmp_path):
    model = rrm.SegNet(width=SMALL)
    state = model.state_dict()
    missing = {k: v for k, v in state.items() if k not in ("b3.conv_branch2a.weight", "fc8.weight")}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ValueError, match=r"missing\.pth does not fit network\.rrm\.SegNet: missing keys: "
                                         r"\['b3\.conv_branch2a\.weight', 'fc8\.weight'\]$"):
        load_weights(model, tmp_path / "missing.pth")
    partial_heads = {k: v for k, v in state.items() if k != "fc8_seg_conv2.bias"}
    torch.save(partial_heads, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys: \['fc8_seg_conv2\.bias'\]"):
        load_weights(model, tmp_path / "partial.pth")
    torch.save({**state, "extra.weight": torch.zeros(1)}, tmp_path / "extra.pth")
    with pytest.raises(ValueError, match=r"extra\.pth does not fit .*: unexpected keys: \['extra\.weight'\]"):
        load_weights(model, tmp_path / "extra.pth")
    torch.save(rrm.SegNet(width=0.125).state_dict(), tmp_path / "wide.pth")
    with pytest.raises(ValueError, match=r"shape mismatches: \['b2\.bn_branch2a\.bias: file \(8,\) vs model \(4,\)'"):
        load_weights(model, tmp_path / "wide.pth")


def test_file_errors(tmp_path):
    model = resnet38d.Net(width=SMALL)
    with pytest.raises(FileNotFoundError, match=r"weights file not found: .*nowhere\.pth"):
        load_weights(model, tmp_path / "nowhere.pth")
    (tmp_path / "w.ckpt").write_bytes(b"x")
    with pytest.raises(ValueError, match=r"w\.ckpt: unknown weights format; expected a \.params .* or \.pth"):
        load_weights(model, tmp_path / "w.ckpt")
    torch.save({"weights": [1, 2]}, tmp_path / "list.pth")
    with pytest.raises(ValueError, match=r"list\.pth: not a state dict"):
        load_weights(model, tmp_path / "list.pth")
    torch.save({"conv1a.weight": Path("x")}, tmp_path / "object.pth")
    with pytest.raises(ValueError, match=r"object\.pth: cannot read as a PyTorch checkpoint with weights_only=True"):
        load_weights(model, tmp_path / "object.pth")
    (tmp_path / "text.pth").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"text\.pth: cannot read as a PyTorch checkpoint"):
        load_weights(model, tmp_path / "text.pth")


def test_shape_mismatches_list_the_first_ten(tmp_path):
    narrow = resnet38d.Net(width=SMALL).state_dict()
    torch.save(narrow, tmp_path / "narrow.pth")
    wide = resnet38d.Net(width=0.125)
    count = sum(narrow[key].shape != value.shape for key, value in wide.state_dict().items())
    assert count > 100
    with pytest.raises(ValueError) as raised:
        load_weights(wide, tmp_path / "narrow.pth")
    message = str(raised.value)
    assert message.count(" vs model ") == 10
    assert message.endswith(f"'] ... and {count - 10} more")
    assert "shape mismatches: ['b2.bn_branch2a.bias: file (4,) vs model (8,)'" in message


def garbage_variants(seed: int) -> list[tuple[str, str, bytes]]:
    """(label, suffix, bytes) of files no loader can read: seeded random, truncated, mutated, foreign."""
    rng = random.Random(seed)
    small_params = (MXNET_DATA / "list.params").read_bytes()
    sparse_params = (MXNET_DATA / "extra_sparse.params").read_bytes()
    checkpoints = []
    for zipped in (True, False):
        buffer = io.BytesIO()
        torch.save({"conv1a.weight": torch.ones(2, 3), "bn7.weight": torch.arange(4)}, buffer,
                   _use_new_zipfile_serialization=zipped)
        checkpoints.append(buffer.getvalue())
    zipped_pth = checkpoints[0]
    variants = [(f"{source} cut to {cut}", ".params", data[:cut])
                for source, data in (("list.params", small_params), ("extra_sparse.params", sparse_params))
                for cut in range(len(data))]
    variants += [(f"checkpoint {kind} cut to {cut}", ".pth", data[:cut])
                 for kind, data in zip(("zip", "legacy"), checkpoints) for cut in range(0, len(data), 3)]
    for suffix in (".params", ".pth"):
        variants += [(f"random {index}", suffix, rng.randbytes(rng.randrange(1, 300))) for index in range(150)]
        variants += [(f"text {text!r}", suffix, text) for text in (b"", b"e", b"hello", b"{}", b"not weights\n")]
    # Random bytes behind a valid start reach deeper into each parser.
    variants += [(f"header + random {index}", ".params", small_params[:rng.randrange(24, 40)]
                  + rng.randbytes(rng.randrange(0, 120))) for index in range(150)]
    variants += [(f"zip magic + random {index}", ".pth", b"PK\x03\x04" + rng.randbytes(rng.randrange(0, 200)))
                 for index in range(100)]
    # Mutated files may still parse; their names fit no model, so loading fails all the same.
    for source, suffix, data in (("list.params", ".params", small_params),
                                 ("extra_sparse.params", ".params", sparse_params),
                                 ("zip checkpoint", ".pth", zipped_pth), ("legacy checkpoint", ".pth", checkpoints[1])):
        for index in range(100):
            mutated = bytearray(data)
            for _ in range(rng.randrange(1, 4)):
                mutated[rng.randrange(len(mutated))] = rng.getrandbits(8)
            variants.append((f"{source} mutated {index}", suffix, bytes(mutated)))
    for members in ({"notes.txt": b"hello"}, {"archive/data.pkl": b"garbage"},
                    {"archive/data.pkl": rng.randbytes(64), "archive/version": b"3\n"}):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            for member, content in members.items():
                archive.writestr(member, content)
        variants.append((f"zip of {sorted(members)}", ".pth", buffer.getvalue()))
    with zipfile.ZipFile(io.BytesIO(zipped_pth)) as source, zipfile.ZipFile(buffer := io.BytesIO(), "w") as target:
        for member in source.namelist():
            if "/data/" not in member:  # a checkpoint whose tensor storages are missing
                target.writestr(member, source.read(member))
    variants.append(("checkpoint without storages", ".pth", buffer.getvalue()))
    return variants


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch warns about garbage protocol bytes
def test_unreadable_files_raise_one_value_error_naming_the_file(tmp_path):
    model = resnet38d.Net(width=SMALL)
    failures = []
    variants = garbage_variants(seed=0)
    assert len(variants) > 2000
    for label, suffix, data in variants:
        path = tmp_path / f"garbage{suffix}"
        path.write_bytes(data)
        try:
            load_weights(model, path)
        except ValueError as error:
            if str(path) not in str(error):
                failures.append(f"{label}{suffix}: message lacks the path: {error}")
        except Exception as error:  # noqa: BLE001 - any other type is the failure under test
            failures.append(f"{label}{suffix}: {type(error).__name__}: {error}")
        else:
            failures.append(f"{label}{suffix}: loaded")
    assert not failures, f"{len(failures)} of {len(variants)} failed, e.g. {failures[:5]}"
    for reader, suffix in ((read_mxnet_params, ".params"), (read_state_dict, ".pth")):
        (tmp_path / f"text{suffix}").write_text("e is not a weights file\n")
        with pytest.raises(ValueError, match=rf"text\{suffix}: "):
            reader(tmp_path / f"text{suffix}")
