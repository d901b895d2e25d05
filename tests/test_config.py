import dataclasses
import math

import pytest

from fedmeta.config import Config, ConfigError


def test_kebab_keys_map_to_fields_and_back():
    cfg = Config.from_mapping({"inner-lr": 0.4, "meta-batch-size": 32, "task": "omniglot"})
    assert cfg.inner_lr == 0.4 and cfg.meta_batch_size == 32 and cfg.task == "omniglot"
    assert Config.from_mapping(cfg.to_mapping()) == cfg


def test_int_widens_to_float_but_not_the_reverse():
    assert Config.from_mapping({"inner-lr": 1}).inner_lr == 1.0
    with pytest.raises(ConfigError, match="meta-batch-size"):
        Config.from_mapping({"meta-batch-size": 2.5})
    with pytest.raises(ConfigError, match="compile"):
        Config.from_mapping({"compile": 1})
    with pytest.raises(ConfigError, match="shots"):
        Config.from_mapping({"shots": True})


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="'inner-learning-rate'"):
        Config.from_mapping({"inner-learning-rate": 0.1})


@pytest.mark.parametrize("key, value", [
    ("inner-lr", 0.0), ("inner-lr", -1.0), ("meta-lr", math.nan), ("shots", 0), ("fraction-train", 1.5),
    ("task", "cifar"), ("algorithm", "sgd"), ("fusion", "median"), ("amplitude-min", 6.0),
    ("lstm-horizon", 30), ("eval-tasks", 0),
])
def test_out_of_range_values_are_rejected_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=key.split("-")[0]):
        Config.from_mapping({key: value})


def test_incompatible_combinations_are_rejected():
    with pytest.raises(ConfigError, match="fusion"):
        Config(algorithm="lstm", fusion="meta-gradient")
    with pytest.raises(ConfigError, match="quadratic"):
        Config(task="quadratic", algorithm="maml")


def test_config_is_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Config().seed = 3  # type: ignore[misc]


def test_omniglot_shots_cannot_exceed_the_drawings():
    with pytest.raises(ConfigError, match="shots \\+ query-shots = 21"):
        Config(task="omniglot", shots=5, query_shots=16)
    with pytest.raises(ConfigError, match="eval-shots \\+ eval-query-shots"):
        Config(task="omniglot", eval_shots=5, eval_query_shots=16)
    cfg = Config(task="omniglot", shots=1, query_shots=15)
    assert cfg.eval_query == 15 and Config().eval_query == 100  # task defaults
