"""The server's store of each partition's kept local Adam state: exact round trips through a checkpoint (new and
old layout), refusal of a state that does not fit, and a checkpoint whose number of tensors does not grow with
the number of partitions (what made checkpoints cost 0.6 ms per partition ever trained). The state travels
packed into one array: exact round trip, in the order of `adam_flatten`, checked by the server's template."""

import io

import pytest
import torch
from flwr.app import ArrayRecord

from clients.client_app import pack_adam, unpack_adam
from fedmeta import wire
from strategies.client_states import ClientStates
from strategies.fedmeta_strategy import packed_adam_template
from strategies.fusion import Rejected, check_size, validate

SHAPES = {"w": (2, 3), "b": (3,)}


def state(seed: int, step: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    tensors = {f"{part}/{k}": torch.randn(*s, generator=g) for part in ("exp_avg", "exp_avg_sq") for k, s in SHAPES.items()}
    return {"step": step, "tensors": tensors}


def same(a: dict, b: dict) -> bool:
    return a["step"] == b["step"] and a["tensors"].keys() == b["tensors"].keys() and all(
        torch.equal(a["tensors"][k], b["tensors"][k]) for k in a["tensors"])


def test_kept_states_replace_earlier_ones_and_survive_growth():
    s = ClientStates()
    assert s.get(3) is None and len(s) == 0
    s.update({3: state(0, 1), 7: state(1, 1)})
    s.update({7: state(2, 2)})  # replaced
    s.update({p: state(100 + p, 5) for p in range(10, 60)})  # beyond the first capacity (16 rows)
    assert len(s) == 52
    assert same(s.get(3), state(0, 1)) and same(s.get(7), state(2, 2)) and same(s.get(59), state(159, 5))
    assert s.get(7)["tensors"]["exp_avg/w"].shape == (2, 3)


def test_checkpoint_round_trip_is_exact_and_its_tensor_count_is_constant():
    s = ClientStates()
    s.update({p: state(p, p + 1) for p in range(200)})
    buf = io.BytesIO()
    torch.save({"clients": s.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf)["clients"]
    assert len(saved["tensors"]) == 4 and saved["tensors"]["exp_avg/w"].shape == (200, 2, 3)  # not 4 x 200 tensors
    restored = ClientStates()
    restored.load_state_dict(saved)
    assert all(same(restored.get(p), state(p, p + 1)) for p in range(200))
    restored.update({200: state(7, 1)})  # and it keeps growing after a resume
    assert same(restored.get(200), state(7, 1)) and same(restored.get(199), state(199, 200))


def test_checkpoints_of_the_per_partition_layout_load_as_packed_states():
    old = {4: state(4, 3), 9: state(9, 1)}  # {partition: {"step", "tensors": per name}}, as written before
    s = ClientStates()
    s.load_state_dict(old)
    for p in (4, 9):  # what pack_adam sends for the same Adam state
        adam = {"step": old[p]["step"], "exp_avg": {}, "exp_avg_sq": {}}
        for name, v in old[p]["tensors"].items():
            part, key = name.split("/")
            adam[part][key] = v
        packed, step = pack_adam(adam)
        assert same(s.get(p), {"step": step, "tensors": {wire.OPTIMIZER: packed}})
    assert s.get(5) is None


def test_packed_adam_round_trips_exactly_and_fits_the_server_template():
    params = {"w": torch.zeros(2, 3), "b": torch.zeros(3)}
    adam = {"step": 4, "exp_avg": {"w": torch.arange(6.0).view(2, 3), "b": torch.tensor([6.0, 7.0, 8.0])},
            "exp_avg_sq": {"w": torch.full((2, 3), 0.5), "b": torch.tensor([1e-30, 2.0, 3.0])}}
    packed, step = pack_adam(adam)
    assert step == 4 and torch.equal(packed, torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, .5, .5, .5, .5, .5, .5,
                                                           1e-30, 2, 3]))
    back = unpack_adam(packed, step, params)
    assert back["step"] == 4 and all(torch.equal(back[part][k], adam[part][k]) for part in ("exp_avg", "exp_avg_sq")
                                     for k in params)
    assert unpack_adam(packed[:-1], step, params) is None  # another model's size: a fresh Adam
    template = packed_adam_template(params)
    assert template[wire.OPTIMIZER].shape == (18,) and template[wire.OPTIMIZER].dtype == torch.float32
    check_size(ArrayRecord({wire.OPTIMIZER: packed}), template)
    validate({wire.OPTIMIZER: packed}, 1, template, 1)
    with pytest.raises(Rejected):
        check_size(ArrayRecord({wire.OPTIMIZER: torch.zeros(100_000)}), template)  # oversized: never unpacked


def test_a_state_that_does_not_fit_the_others_is_refused():
    s = ClientStates()
    s.update({0: state(0, 1)})
    bad = state(1, 1)
    bad["tensors"]["exp_avg/w"] = torch.zeros(3, 2)
    with pytest.raises(ValueError, match="partition 1"):
        s.update({1: bad})
    wrong_dtype = state(2, 1)
    wrong_dtype["tensors"]["exp_avg/b"] = torch.zeros(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not fit"):
        s.update({2: wrong_dtype})
    assert s.get(1) is None and s.get(2) is None
