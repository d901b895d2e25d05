"""clients.records: the fast codec writes exactly Flower's bytes and reads every array Flower reads."""

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord

from clients.records import from_array, from_record, to_record

TENSORS = {"w": torch.randn(40, 1, generator=torch.Generator().manual_seed(0)), "b": torch.arange(3.0),
           "scalar": torch.tensor(2.5, dtype=torch.float64), "ints": torch.tensor([[1, -2], [3, 4]]),
           "empty": torch.zeros(0, 4), "half": torch.ones(5, dtype=torch.float16), "flag": torch.tensor([True, False])}


def test_writes_flowers_bytes_in_order():
    ours, flowers = to_record(TENSORS), ArrayRecord(TENSORS)
    assert list(ours) == list(flowers) == list(TENSORS)
    for key in TENSORS:
        assert (ours[key].dtype, ours[key].shape, ours[key].stype) == (flowers[key].dtype, flowers[key].shape,
                                                                        flowers[key].stype)
        assert ours[key].data == flowers[key].data, key
    # a non-contiguous tensor (a transpose) is written as Flower writes its C-order copy
    t = torch.randn(3, 5).T
    assert to_record({"t": t})["t"].data == ArrayRecord({"t": t.contiguous()})["t"].data


def test_reads_what_flower_reads():
    back = from_record(ArrayRecord(TENSORS))
    assert list(back) == list(TENSORS)
    for key, t in TENSORS.items():
        assert back[key].dtype == t.dtype and back[key].shape == t.shape and torch.equal(back[key], t), key
    back["w"] += 1  # writable, and not a view of the message's bytes
    assert from_record(ArrayRecord(TENSORS))["w"].equal(TENSORS["w"])


def test_other_layouts_go_through_flowers_reader():
    fortran = np.asfortranarray(np.arange(6.0).reshape(2, 3))
    array = Array(fortran)  # np.save keeps Fortran order: another header
    assert torch.equal(from_array(array), torch.arange(6.0, dtype=torch.float64).reshape(2, 3))


def test_lying_arrays_are_not_trusted():
    good = Array(np.arange(4, dtype=np.float32))
    # the fields say float64 (2 values) while the header says float32: Flower's reader decides (float32, 4 values)
    lying = Array(dtype="float64", shape=(2,), stype=good.stype, data=good.data)
    assert from_array(lying).tolist() == [0.0, 1.0, 2.0, 3.0]
    # a huge claimed shape is never allocated to build a header, and Flower's reader refuses short data
    huge = Array(dtype="float32", shape=(10**12,), stype=good.stype, data=good.data)
    assert from_array(huge).numel() == 4
    with pytest.raises(ValueError):
        from_array(Array(dtype="float32", shape=(4,), stype=good.stype, data=good.data[:-4]))
    with pytest.raises(TypeError):
        from_array(Array(dtype="float32", shape=(4,), stype="torch.Tensor", data=good.data))
