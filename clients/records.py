"""Tensors to Flower ArrayRecords and back, byte for byte what Flower writes, without its per-array cost.

Used at both ends of the wire (the ClientApp and the strategy). Flower's `ArrayRecord(state_dict)` and
`ArrayRecord.to_torch_state_dict()` serialise every array with `np.save` / `np.load`, which parse the
`.npy` header each time: about 20 us to write and 25 us to read a small tensor, 0.3 ms per sinusoid
reply at each end (6 model arrays, the packed Adam state), a large share of fedmeta's cost per
client-round at 100+ sampled clients (issue 12). Here the header of each (dtype, shape) is built once
(by `np.save` itself, so the bytes are exactly Flower's) and the data is the tensor's bytes after it;
reading checks that the array's bytes are that header plus exactly the bytes its dtype and shape
imply and then views them (`np.frombuffer`). Anything else (a Fortran-order array, another numpy's
header, a non-numpy `stype`) goes through Flower's own `Array.numpy()`, so every array Flower can read
reads the same here, and object dtypes are never unpickled (Flower's `allow_pickle=False` holds too).
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

NUMPY = "numpy.ndarray"  # flwr's SType.NUMPY: the .npy format


@functools.lru_cache(maxsize=1024)
def _header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    """The .npy header `np.save` writes for a C-order array of this dtype and shape."""
    buf = io.BytesIO()
    np.save(buf, np.empty(shape, dtype), allow_pickle=False)
    data = buf.getvalue()
    return data[: len(data) - math.prod(shape) * dtype.itemsize]


def to_array(tensor: torch.Tensor) -> Array:
    """One tensor as a Flower Array (on the CPU, C order): the bytes `Array(tensor)` would hold."""
    a = tensor.detach().cpu().numpy()
    if not a.flags.c_contiguous:  # (not np.ascontiguousarray: it makes a 0-d array 1-d)
        a = a.copy(order="C")
    return Array(str(a.dtype), tuple(a.shape), NUMPY, _header(a.dtype, a.shape) + a.tobytes())


def to_record(tensors: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """A dict of tensors as an ArrayRecord, in the dict's order (as `ArrayRecord(state_dict)`)."""
    record = ArrayRecord()
    for key, tensor in tensors.items():
        record[key] = to_array(tensor)
    return record


def from_array(array: Array) -> torch.Tensor:
    """One Flower Array as a (writable, CPU) tensor; the same values as `torch.from_numpy(array.numpy())`."""
    try:
        dtype = np.dtype(array.dtype)
    except TypeError:  # not a numpy dtype name: Flower's reader says why
        dtype = None
    shape = tuple(array.shape)
    if (dtype is not None and not dtype.hasobject and array.stype == NUMPY and all(d >= 0 for d in shape)
            and math.prod(shape) * dtype.itemsize < len(array.data)):  # bytes for it are there: no huge header build
        head = _header(dtype, shape)
        if len(array.data) == len(head) + math.prod(shape) * dtype.itemsize and array.data.startswith(head):
            values = np.frombuffer(array.data, dtype, offset=len(head)).reshape(shape)
            return torch.from_numpy(values.copy())  # a copy: the message's bytes are read-only
    return torch.from_numpy(array.numpy())


def from_record(record: Mapping[str, Array]) -> dict[str, torch.Tensor]:
    """An ArrayRecord as a dict of tensors, in the record's order (as `to_torch_state_dict()`)."""
    return {key: from_array(array) for key, array in record.items()}
