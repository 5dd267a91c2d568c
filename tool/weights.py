"""Loading released weights: MXNet `.params` (read with numpy, no mxnet) and PyTorch `.pth`."""
from __future__ import annotations

import logging
import math
import os
import struct

import numpy as np
import torch
from torch import nn

from tool.checkpoint import verify_checksum_file
from tool.datasets import DATASETS

logger = logging.getLogger(__name__)

LIST_MAGIC = 0x112
V1_MAGIC = 0xF993FAC8
V2_MAGIC = 0xF993FAC9
V3_MAGIC = 0xF993FACA
MXNET_DTYPES = {0: np.float32, 1: np.float64, 2: np.float16, 3: np.uint8, 4: np.int32,
                5: np.int8, 6: np.int64, 7: np.bool_}
# MXNet's NDArrayStorageType: kRowSparseStorage = 1, kCSRStorage = 2 (as the bytes MXNet writes show).
SPARSE_STORAGE = {1: "row_sparse", 2: "csr"}
SPARSE_AUX_COUNT = {1: 1, 2: 2}  # row_sparse: row indices; csr: row pointers and column indices
BN_FIELDS = {"gamma": "weight", "beta": "bias", "mean": "running_mean", "var": "running_var"}
# Layers a classification / ImageNet checkpoint lacks; they keep their initialisation.
HEAD_PREFIXES = ("fc8_seg_conv", "GAU_w")
CLASSIFIER_PREFIX = "fc8."
# Parameters whose first dimension is the class count (fc8) or the class count + 1 (segmentation heads).
CLASS_HEAD_KEYS = ("fc8.weight", "fc8_seg_conv2.weight", "fc8_seg_conv2.bias", "fc8_seg_conv4.weight")
MAX_LISTED = 10  # shape mismatches spelled out in a load error


class _Reader:
    """Little-endian cursor over the bytes of one file; errors name the file."""

    def __init__(self, path: str, data: bytes) -> None:
        self.path, self.data, self.pos = path, data, 0

    def take(self, count: int) -> bytes:
        if count < 0 or self.pos + count > len(self.data):
            raise ValueError(f"{self.path}: MXNet .params file is truncated (needed {count} bytes at "
                             f"offset {self.pos}, file has {len(self.data)})")
        chunk = self.data[self.pos:self.pos + count]
        self.pos += count
        return chunk

    def unpack(self, fmt: str, count: int = 1) -> tuple:
        size = struct.calcsize("<" + fmt) * count
        return struct.unpack("<" + fmt * count, self.take(size))


def _as_array(reader: _Reader, index: int, raw: bytes, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    try:
        return np.frombuffer(raw, dtype=dtype).reshape(shape).astype(dtype.newbyteorder("="))
    except ValueError as error:  # numpy refuses shapes whose size overflows, e.g. (0, 2**62)
        raise ValueError(f"{reader.path}: array {index} has unusable shape {shape} ({error})") from error


def _read_shape(reader: _Reader, index: int, head: int) -> tuple[int, ...] | None:
    """A TShape (i32 ndim, i64 dims); None for the unknown shape of a V3 "none" array."""
    (ndim,) = reader.unpack("i")
    if head == V3_MAGIC and ndim == -1:
        return None
    if ndim < 0 or ndim > 32:
        raise ValueError(f"{reader.path}: array {index} has invalid ndim {ndim}; "
                         "not a valid MXNet .params file")
    shape = reader.unpack("q", ndim)
    if any(dim < 0 for dim in shape):
        raise ValueError(f"{reader.path}: array {index} has negative dimension in shape {shape}")
    return shape


def _read_dtype(reader: _Reader, index: int) -> np.dtype:
    (type_flag,) = reader.unpack("i")
    if type_flag not in MXNET_DTYPES:
        raise ValueError(f"{reader.path}: array {index} has unknown dtype flag {type_flag}; "
                         f"known flags: {sorted(MXNET_DTYPES)}")
    return np.dtype(MXNET_DTYPES[type_flag]).newbyteorder("<")


def _read_blob(reader: _Reader, index: int, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    return _as_array(reader, index, reader.take(math.prod(shape) * dtype.itemsize), dtype, shape)


def _densify(reader: _Reader, index: int, storage_type: int, shape: tuple[int, ...],
             values: np.ndarray, aux: list[np.ndarray]) -> np.ndarray:
    """The dense array MXNet's `tostype('default')` gives for row_sparse (1) or csr (2) storage."""
    def invalid(reason: str) -> ValueError:
        return ValueError(f"{reader.path}: array {index} ({SPARSE_STORAGE[storage_type]}, shape {shape}) "
                          f"is not a valid sparse array: {reason}")
    if any(array.dtype.kind not in "iu" for array in aux):
        raise invalid(f"index arrays have dtypes {[str(array.dtype) for array in aux]}, not integers")
    indices = [array.astype(np.int64) for array in aux]  # uint64 beyond int64 turns negative: refused below
    if SPARSE_STORAGE[storage_type] == "csr":
        indptr, columns = indices
        if len(shape) != 2 or values.ndim != 1 or columns.shape != values.shape:
            raise invalid(f"csr needs a 2-D shape and as many column indices {columns.shape} as values "
                          f"{values.shape}")
        if (indptr.shape != (shape[0] + 1,) or indptr[0] != 0 or indptr[-1] != values.size
                or np.any(np.diff(indptr) < 0)):
            raise invalid(f"row pointers {indptr.tolist()} do not delimit {values.size} values in "
                          f"{shape[0]} rows")
        if np.any((columns < 0) | (columns >= shape[1])):
            raise invalid(f"column indices {columns.tolist()} outside [0, {shape[1]})")
        target = (np.repeat(np.arange(shape[0]), np.diff(indptr)), columns)
    else:
        (rows,) = indices
        if not shape or values.shape != (rows.size, *shape[1:]):
            raise invalid(f"row_sparse values {values.shape} do not match {rows.size} rows of shape {shape}")
        if np.any((rows < 0) | (rows >= shape[0])):
            raise invalid(f"row indices {rows.tolist()} outside [0, {shape[0]})")
        target = rows
    try:
        dense = np.zeros(shape, values.dtype)
    except (ValueError, MemoryError) as error:
        raise invalid(f"cannot allocate the dense array ({type(error).__name__})") from error
    dense[target] = values
    return dense


def _read_array(reader: _Reader, index: int) -> np.ndarray:
    (head,) = reader.unpack("I")
    if head in (V1_MAGIC, V2_MAGIC, V3_MAGIC):
        storage_type = 0
        if head != V1_MAGIC:
            (storage_type,) = reader.unpack("i")
            if storage_type != 0 and storage_type not in SPARSE_STORAGE:
                raise ValueError(f"{reader.path}: array {index} has unknown storage type "
                                 f"{storage_type}; known: 0 (dense), 1 (row_sparse), 2 (csr)")
        # Sparse arrays store the shape of their values before the logical shape.
        storage_shape = _read_shape(reader, index, head) if storage_type else None
        shape = _read_shape(reader, index, head)
        if shape is None or (storage_type and storage_shape is None):
            return np.zeros((0,), np.float32)  # an unknown-shape ("none") array carries no data
        if len(shape) == 0 and head != V3_MAGIC:
            return np.zeros((0,), np.float32)  # before V3, ndim 0 marks an empty array without data
        reader.unpack("i", 2)  # device type and id
        dtype = _read_dtype(reader, index)
        if not storage_type:
            return _read_blob(reader, index, dtype, shape)
        aux_layouts = []
        for _ in range(SPARSE_AUX_COUNT[storage_type]):
            aux_dtype = _read_dtype(reader, index)
            aux_shape = _read_shape(reader, index, head)
            if aux_shape is None:
                raise ValueError(f"{reader.path}: array {index} has a sparse index array of unknown shape")
            aux_layouts.append((aux_dtype, aux_shape))
        values = _read_blob(reader, index, dtype, storage_shape)
        aux = [_read_blob(reader, index, aux_dtype, aux_shape) for aux_dtype, aux_shape in aux_layouts]
        return _densify(reader, index, storage_type, shape, values, aux)
    # The oldest layout has no magic: the word is ndim, followed by u32 dims.
    ndim = head
    if ndim > 32:
        raise ValueError(f"{reader.path}: array {index} starts with 0x{head:08X}, neither an "
                         "NDArray magic nor a plausible ndim; not a valid MXNet .params file")
    shape = reader.unpack("I", ndim)
    if ndim == 0:
        return np.zeros((0,), np.float32)  # ndim 0 marks an empty array without data
    reader.unpack("i", 2)  # device type and id
    return _read_blob(reader, index, _read_dtype(reader, index), shape)


def read_mxnet_params(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Names -> arrays of an MXNet `nd.save` file (names keep their `arg:`/`aux:` prefix).

    A file saved from a list has no names; its arrays are keyed "0", "1", ... in order.
    Sparse (row_sparse, csr) arrays are returned dense.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"MXNet weights file not found: {path}")
    with open(path, "rb") as handle:
        reader = _Reader(path, handle.read())
    if len(reader.data) < 8 or reader.unpack("Q")[0] != LIST_MAGIC:
        raise ValueError(f"{path}: not an MXNet NDArray (.params) file (missing header 0x112)")
    reader.unpack("Q")  # reserved
    (num_arrays,) = reader.unpack("Q")
    arrays = [_read_array(reader, index) for index in range(num_arrays)]
    (num_names,) = reader.unpack("Q")
    if num_names not in (0, num_arrays):
        raise ValueError(f"{path}: MXNet .params file has {num_arrays} arrays but {num_names} names")
    names = []
    for position in range(num_names):
        (length,) = reader.unpack("Q")
        try:
            names.append(reader.take(length).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ValueError(f"{path}: MXNet array name {position} is not UTF-8 ({error.reason})") from error
    if not num_names:
        names = [str(position) for position in range(num_arrays)]  # as mx.nd.load's list
    if reader.pos != len(reader.data):
        raise ValueError(f"{path}: {len(reader.data) - reader.pos} unexpected bytes after the "
                         "MXNet name list; not a valid .params file")
    if len(set(names)) != len(names):
        raise ValueError(f"{path}: MXNet .params file repeats array names")
    return dict(zip(names, arrays))


def _bn_field(name: str, last_token: str) -> str:
    if last_token not in BN_FIELDS:
        raise ValueError(f"MXNet parameter {name!r}: unknown BatchNorm field {last_token!r}; "
                         f"expected one of {sorted(BN_FIELDS)}")
    return BN_FIELDS[last_token]


def mxnet_name_to_resnet38(name: str) -> str | None:
    """The backbone parameter name of one MXNet ResNet-38 name (SPEC §2); None when dropped."""
    tokens = name.split(":", 1)[-1].split("_")
    first = tokens[0]
    if "conv1a" in first:
        return "conv1a.weight"
    if "linear1000" in first:
        return None
    if len(tokens) > 1 and "branch" in tokens[1]:
        if len(first) < 3 or not first[-1].isalnum():
            raise ValueError(f"MXNet parameter {name!r}: cannot read the block from {first!r}")
        block = f"b{first[-2]}" if first.endswith("a") else f"b{first[-3]}_{first[-1]}"
        if first.startswith("res"):
            return f"{block}.conv_{tokens[1]}.weight"
        return f"{block}.bn_{tokens[1]}.{_bn_field(name, tokens[-1])}"
    return f"bn7.{_bn_field(name, tokens[-1])}"


def mxnet_to_resnet38(params: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Backbone state dict (float32 tensors) from MXNet ResNet-38 arrays; linear1000 dropped."""
    converted: dict[str, torch.Tensor] = {}
    sources: dict[str, str] = {}
    for name, array in params.items():
        target = mxnet_name_to_resnet38(name)
        if target is None:
            continue
        if target in converted:
            raise ValueError(f"MXNet parameters {sources[target]!r} and {name!r} both map to {target!r}")
        sources[target] = name
        converted[target] = torch.from_numpy(np.ascontiguousarray(array, dtype=np.float32))
    return converted


def _unwrap_checkpoint(checkpoint: object, path: str) -> dict[str, torch.Tensor]:
    while isinstance(checkpoint, dict):
        wrapped = [key for key in ("state_dict", "model") if isinstance(checkpoint.get(key), dict)]
        if not wrapped:
            break
        checkpoint = checkpoint[wrapped[0]]
    if not isinstance(checkpoint, dict) or not all(
            isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in checkpoint.items()):
        raise ValueError(f"{path}: not a state dict (expected a dict of name -> tensor, possibly "
                         "inside a 'state_dict' or 'model' entry)")
    # Checkpoints saved from DataParallel/DDP prefix every key with "module.".
    if checkpoint and all(key.startswith("module.") for key in checkpoint):
        checkpoint = {key[len("module."):]: value for key, value in checkpoint.items()}
    return checkpoint


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The parameter dict stored in a `.params` or `.pth` file, with backbone names."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"weights file not found: {path}")
    verify_checksum_file(path)  # weights this project wrote carry <file>.sha256; released ones do not
    if path.endswith(".params"):
        params = read_mxnet_params(path)
        if params and list(params) == [str(position) for position in range(len(params))]:
            raise ValueError(f"{path}: MXNet .params file was saved from a list and has no parameter "
                             "names; cannot map it to ResNet-38")
        try:
            return mxnet_to_resnet38(params)
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from error
    if path.endswith(".pth"):
        try:
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # on corrupt bytes torch.load raises nearly any type (KeyError, ...)
            raise ValueError(f"{path}: cannot read as a PyTorch checkpoint with weights_only=True "
                             f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''})"
                             ) from error
        return _unwrap_checkpoint(checkpoint, path)
    raise ValueError(f"{path}: unknown weights format; expected a .params (MXNet) or .pth (PyTorch) file")


def _allowed_missing(model_keys: set[str], state: dict[str, torch.Tensor], is_mxnet: bool) -> set[str]:
    """Keys a partial checkpoint may lack: heads (and for MXNet, fc8) absent from it entirely."""
    prefixes = HEAD_PREFIXES + ((CLASSIFIER_PREFIX,) if is_mxnet else ())
    if any(key.startswith(prefixes) for key in state):
        return set()
    return {key for key in model_keys if key.startswith(prefixes)}


def _class_head_mismatch(state: dict[str, torch.Tensor], model_state: dict[str, torch.Tensor]) -> str | None:
    """The error for class heads sized for another class count (a VOC checkpoint in a COCO run, or
    the reverse), naming each head's shapes; None when they fit."""
    differing = [key for key in CLASS_HEAD_KEYS if key in state and key in model_state
                 and state[key].shape[:1] != model_state[key].shape[:1]]
    if not differing:
        return None

    def classes(shapes: dict[str, torch.Tensor], key: str) -> int:
        return shapes[key].shape[0] - (0 if key.startswith(CLASSIFIER_PREFIX) else 1)
    shapes = "; ".join(f"{key}: file {tuple(state[key].shape)} vs model {tuple(model_state[key].shape)}"
                       for key in differing)
    counts = ", ".join(f"{info.title} has {info.num_classes}" for info in DATASETS.values())
    return (f"its class heads are for {classes(state, differing[0])} classes but the model's for "
            f"{classes(model_state, differing[0])} ({shapes}): a checkpoint of another data set "
            f"({counts}; see --dataset)")


def load_weights(model: nn.Module, path: str | os.PathLike, allow_missing_heads: bool | None = None) -> None:
    """Load `path` into `model`, checking every key.

    Missing or unexpected keys are an error that lists them, with two exceptions: BatchNorm's
    `num_batches_tracked` (old checkpoints lack it) and the layers a partial checkpoint does
    not have (the seg/GAU heads of a classification `.pth`; also fc8 for the MXNet ImageNet
    init). `allow_missing_heads=None` allows those when the file has none of them at all,
    True always allows them, False never does.
    """
    path = os.fspath(path)
    state = read_state_dict(path)
    model_state = model.state_dict()
    model_keys = set(model_state)
    missing = model_keys - set(state) - {key for key in model_keys if key.endswith("num_batches_tracked")}
    unexpected = set(state) - model_keys
    allowed: set[str] = set()
    if allow_missing_heads is not False:
        allowed = missing & _allowed_missing(model_keys, {} if allow_missing_heads else state,
                                             path.endswith(".params"))
    errors = []
    if missing - allowed:
        errors.append(f"missing keys: {sorted(missing - allowed)}")
    if unexpected:
        errors.append(f"unexpected keys: {sorted(unexpected)}")
    head_error = _class_head_mismatch(state, model_state)
    if head_error:
        errors.append(head_error)
    mismatched = [f"{key}: file {tuple(state[key].shape)} vs model {tuple(model_state[key].shape)}"
                  for key in sorted(set(state) & model_keys) if state[key].shape != model_state[key].shape
                  and not (head_error and key in CLASS_HEAD_KEYS)]
    if mismatched:
        # A model of another width mismatches nearly every tensor: the first few say enough.
        more = f" ... and {len(mismatched) - MAX_LISTED} more" if len(mismatched) > MAX_LISTED else ""
        errors.append(f"shape mismatches: {mismatched[:MAX_LISTED]}{more}")
    if errors:
        raise ValueError(f"{path} does not fit {type(model).__module__}.{type(model).__name__}: "
                         + "; ".join(errors))
    model.load_state_dict(state, strict=False)
    if allowed:
        logger.warning("%s: %d parameters not in the file keep their initialisation: %s",
                       path, len(allowed), ", ".join(sorted({key.split(".")[0] for key in allowed})))
