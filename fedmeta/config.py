"""One typed, validated configuration for every knob of fedmeta.

`Config` mirrors `[tool.flwr.app.config]` in `pyproject.toml`: a kebab-case run-config key
(`inner-lr`) maps to the snake_case field (`inner_lr`). `Config.from_mapping` rejects unknown keys
and values of the wrong type, naming the key; `__post_init__` checks ranges and combinations. The
server builds it once at start-up (a bad `--run-config` refuses to start the run), sends the
mapping to every client, and writes it to `config.json` with every run.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

TASKS = ("sinusoid", "quadratic", "omniglot")
ALGORITHMS = ("maml", "fomaml", "metasgd", "reptile", "lstm", "pretrain", "pretrain-global")
FUSIONS = ("average", "meta-gradient")
AGGREGATORS = ("mean", "median", "trimmed-mean", "clipped-mean", "krum")
WEIGHT_POLICIES = ("claimed", "equal", "capped")
SERVER_OPTIMIZERS = ("auto", "sgd", "adam", "yogi", "adagrad")
SCHEDULES = ("constant", "step", "cosine")
PARTITIONS = ("non-iid", "iid")
DEVICES = ("cpu", "cuda", "auto")
DRIFT_CORRECTIONS = ("none", "scaffold")
OMNIGLOT_DRAWINGS = 20  # drawings per character: support + query per class cannot exceed it


class ConfigError(ValueError):
    """A configuration key is unknown or its value is of the wrong type or out of range."""


@dataclass(frozen=True)
class Config:
    # --- reproducibility and execution -------------------------------------------------
    seed: int = 0
    device: str = "cpu"
    threads: int = 1  # torch intra-op threads per process (each simulated client)
    compile: bool = False  # torch.compile the meta-gradient (pays a warm-up per process)

    # --- task family ---------------------------------------------------------------------
    task: str = "sinusoid"
    shots: int = 10  # K support examples per task (per class for omniglot)
    query_shots: int = 10  # query examples per task (per class for omniglot)
    ways: int = 5  # classes per omniglot episode
    # sinusoid (Finn et al. 2017, §5.1): y = A sin(x - phase)
    amplitude_min: float = 0.1
    amplitude_max: float = 5.0
    phase_min: float = 0.0
    phase_max: float = math.pi
    x_min: float = -5.0
    x_max: float = 5.0
    # quadratic (Andrychowicz et al. 2016): f(theta) = ||W theta - y||^2
    quadratic_dim: int = 10
    quadratic_scale_min: float = 1.0  # W ~ N(0, s^2), s drawn per client family
    quadratic_scale_max: float = 1.0
    # omniglot
    data_dir: str = "../shared/data/omniglot"
    omniglot_split: str = "character"  # "character" (1200/423) or "alphabet" (background/evaluation)
    omniglot_rotations: bool = True

    # --- meta-learning ---------------------------------------------------------------------
    algorithm: str = "maml"
    inner_steps: int = 1
    inner_lr: float = 0.01
    meta_lr: float = 1e-3  # Adam on the client (or central) meta-parameters
    meta_batch_size: int = 25
    # LSTM meta-optimizer (Andrychowicz et al. 2016)
    lstm_hidden: int = 20
    lstm_layers: int = 2
    lstm_unroll: int = 20
    lstm_horizon: int = 100
    lstm_preprocess_p: float = 10.0
    lstm_output_scale: float = 0.1
    # test-time adaptation (all algorithms)
    eval_shots: int = 5
    eval_query_shots: int = 0  # 0: the task's default (`eval_query`): sinusoid 100 points, else query-shots
    eval_steps: int = 10
    eval_tasks: int = 100

    # --- federation -----------------------------------------------------------------------
    num_rounds: int = 10
    local_iterations: int = 200
    fusion: str = "average"
    # "average": each partition's local Adam survives rounds (the server keeps it, keyed by partition,
    # sends it with the partition's next TRAIN message and stores it in checkpoints); False: a fresh
    # Adam every round, whose first steps are sign-like (lr per coordinate) whatever the gradient noise
    keep_optimizer_state: bool = True
    # "scaffold": each local meta-gradient g becomes g - c_i + c, the partition's and the federation's
    # control variates (Karimireddy et al. 2020), against the drift of non-IID partitions (fedmeta/drift.py)
    drift_correction: str = "none"
    fraction_train: float = 1.0
    min_train_nodes: int = 1  # training partitions sampled per round at least (held-out ones never count)
    min_train_replies: int = 1  # fewer valid replies in a round: the model stays unchanged (recorded)
    heldout_partitions: int = 2  # the last partitions: never trained on, used for evaluation
    partition: str = "non-iid"
    # True: partitions are virtual clients that the server binds to nodes (simulation: no discovery, any
    # node serves any partition); False: each node serves the partition of its node config (deployment
    # with data of its own) and reports it once, when it first connects
    assign_partitions: bool = True
    num_partitions: int = 0  # 0: the number of nodes connected when the run starts (assign-partitions)
    eval_every: int = 1
    server_eval_tasks: int = 0  # >0: the server also evaluates on fresh tasks of the full range
    max_client_weight: float = 1e6  # replies claiming more are rejected as absurd
    node_wait_timeout: float = 120.0  # how long the server waits for enough nodes before failing
    round_timeout: float = 3600.0  # how long a round waits for replies (stragglers are cut)
    poll_interval: float = 0.02  # seconds between the server's pulls of client replies
    linkstate_index: bool = True  # simulation: no per-node LinkState scan, no fixed 0.1 s pump wait (linkstate_index.py)
    checkpoint_every: int = 1
    results_dir: str = ""  # absolute path of the run directory's parent; "" = ./results
    run_name: str = ""  # "" = <task>-<algorithm>-<fusion>-<timestamp>
    resume: str = ""  # a checkpoint, or a run directory / its checkpoints/ (the newest valid checkpoint)

    # --- fusion: weight policy -> aggregator -> server optimizer (strategies/fusion.py) -------------
    weight_policy: str = "claimed"  # "claimed" | "equal" | "capped" (at weight-cap x the round's median claim)
    weight_cap: float = 3.0
    aggregator: str = "mean"  # "mean" | "median" | "trimmed-mean" | "clipped-mean" | "krum"
    trim_fraction: float = 0.1  # trimmed mean: drop this fraction of replies at each end, per coordinate
    clip_multiple: float = 2.0  # clipped mean: each update clipped to clip-multiple x the round's median norm
    krum_byzantine: int = 1  # (multi-)Krum: replies assumed Byzantine (f)
    krum_select: int = 0  # multi-Krum: replies averaged (m); 0: n - f
    # the server optimizer steps the pseudo-gradient: global - fused model ("average") or the fused
    # meta-gradient ("meta-gradient"); "auto": SGD (lr 1 = plain averaging) for "average", Adam for
    # "meta-gradient" (Reddi et al. 2021, "Adaptive Federated Optimization")
    server_optimizer: str = "auto"  # "auto" | "sgd" | "adam" | "yogi" | "adagrad"
    server_lr: float = 0.0  # 0: the optimizer's default (sgd 1.0, adam / yogi / adagrad 1e-3)
    server_momentum: float = 0.0  # sgd only (FedAvgM)
    server_beta1: float = 0.9
    server_beta2: float = 0.999
    server_eps: float = 1e-8  # adaptivity (tau in Reddi et al.)
    server_lr_schedule: str = "constant"  # "constant" | "step" | "cosine" over the rounds
    client_lr_schedule: str = "constant"  # the same, for the clients' meta-lr
    schedule_step_every: int = 100  # "step": multiply by schedule-step-factor every this many rounds
    schedule_step_factor: float = 0.5
    schedule_min_factor: float = 0.0  # "cosine": the factor at the last round
    # a fused pseudo-gradient longer than update-norm-cap x the median of recent rounds' (or, in the
    # first round, of this round's replies') norms is scaled down to it; 0: off
    update_norm_cap: float = 10.0

    def __post_init__(self) -> None:
        choice = {"task": TASKS, "algorithm": ALGORITHMS, "fusion": FUSIONS,
                  "partition": PARTITIONS, "device": DEVICES,
                  "omniglot_split": ("character", "alphabet"), "aggregator": AGGREGATORS,
                  "weight_policy": WEIGHT_POLICIES, "server_optimizer": SERVER_OPTIMIZERS,
                  "server_lr_schedule": SCHEDULES, "client_lr_schedule": SCHEDULES,
                  "drift_correction": DRIFT_CORRECTIONS}
        for name, allowed in choice.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"{_key(name)} = {getattr(self, name)!r}: must be one of {allowed}")
        positive = ("threads", "shots", "query_shots", "inner_lr", "meta_lr", "meta_batch_size",
                    "quadratic_dim", "quadratic_scale_min", "lstm_hidden", "lstm_layers", "lstm_unroll",
                    "lstm_horizon", "lstm_preprocess_p", "lstm_output_scale", "eval_shots",
                    "eval_tasks", "num_rounds", "local_iterations", "eval_every",
                    "max_client_weight", "round_timeout", "poll_interval", "checkpoint_every", "min_train_nodes",
                    "min_train_replies", "node_wait_timeout", "weight_cap", "clip_multiple", "server_eps",
                    "schedule_step_every", "schedule_step_factor")
        for name in positive:
            value = getattr(self, name)
            if not (value > 0 and math.isfinite(value)):
                raise ConfigError(f"{_key(name)} = {value!r}: must be a finite number > 0")
        for name in ("seed", "inner_steps", "eval_steps", "heldout_partitions", "server_eval_tasks",
                     "eval_query_shots", "num_partitions", "server_lr", "server_momentum", "krum_byzantine",
                     "krum_select", "schedule_min_factor", "update_norm_cap"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{_key(name)} = {getattr(self, name)!r}: must be >= 0")
        for name in ("server_lr", "server_momentum", "schedule_min_factor", "update_norm_cap"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{_key(name)} = {getattr(self, name)!r}: must be finite")
        for name in ("server_momentum", "server_beta1", "server_beta2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_key(name)} = {getattr(self, name)!r}: must be in [0, 1)")
        if not 0.0 <= self.trim_fraction < 0.5:
            raise ConfigError(f"trim-fraction = {self.trim_fraction}: must be in [0, 0.5)")
        if self.schedule_min_factor > 1.0 or self.schedule_step_factor > 1.0:
            raise ConfigError("schedule-min-factor and schedule-step-factor must be <= 1 (a schedule only decays)")
        if self.weight_cap < 1.0:
            raise ConfigError(f"weight-cap = {self.weight_cap}: must be >= 1 (a multiple of the median claim)")
        if self.server_momentum and self.resolved_server_optimizer != "sgd":
            raise ConfigError(f"server-momentum = {self.server_momentum} applies to server-optimizer = 'sgd' "
                              f"only, not {self.resolved_server_optimizer!r}")
        if self.num_partitions and self.heldout_partitions >= self.num_partitions:
            raise ConfigError(f"heldout-partitions = {self.heldout_partitions} leaves no training partition "
                              f"of num-partitions = {self.num_partitions}")
        if self.ways < 2:
            raise ConfigError(f"ways = {self.ways}: an episode needs at least 2 classes")
        if not 0.0 < self.fraction_train <= 1.0:
            raise ConfigError(f"fraction-train = {self.fraction_train}: must be in (0, 1]")
        for lo, hi in (("amplitude_min", "amplitude_max"), ("phase_min", "phase_max"),
                       ("x_min", "x_max"), ("quadratic_scale_min", "quadratic_scale_max")):
            if not getattr(self, lo) <= getattr(self, hi):
                raise ConfigError(f"{_key(lo)} = {getattr(self, lo)} exceeds {_key(hi)} = {getattr(self, hi)}")
        if self.amplitude_min <= 0:
            raise ConfigError(f"amplitude-min = {self.amplitude_min}: must be > 0")
        if self.lstm_unroll > self.lstm_horizon or self.lstm_horizon % self.lstm_unroll:
            raise ConfigError(f"lstm-horizon = {self.lstm_horizon} must be a multiple of "
                              f"lstm-unroll = {self.lstm_unroll}")
        if self.task == "quadratic" and self.algorithm != "lstm":
            raise ConfigError(f"algorithm = {self.algorithm!r} with task = 'quadratic': quadratic "
                              "problems have no support/query split; use algorithm = 'lstm'")
        if self.fusion == "meta-gradient" and self.algorithm in ("lstm", "reptile", "pretrain"):
            raise ConfigError(f"fusion = 'meta-gradient' needs a one-step meta-gradient; algorithm = "
                              f"{self.algorithm!r} supports fusion = 'average' only")
        if self.drift_correction != "none" and (self.fusion != "average" or self.algorithm == "lstm"):
            raise ConfigError(f"drift-correction = {self.drift_correction!r} corrects the local meta-gradients of "
                              f"fusion = 'average'; not fusion = {self.fusion!r} with algorithm = {self.algorithm!r}")
        if self.task == "omniglot":
            for a, b, total in (("shots", "query_shots", self.shots + self.query_shots),
                                ("eval_shots", "eval_query_shots", self.eval_shots + self.eval_query)):
                if total > OMNIGLOT_DRAWINGS:
                    raise ConfigError(f"{_key(a)} + {_key(b)} = {total}: an omniglot character has only "
                                      f"{OMNIGLOT_DRAWINGS} drawings")
        if self.algorithm == "pretrain-global" and self.task != "omniglot":
            raise ConfigError(f"algorithm = 'pretrain-global' trains a classifier over global class labels; "
                              f"task = {self.task!r} is not a classification task (use task = 'omniglot')")
        if self.inner_steps == 0 and self.algorithm not in ("pretrain", "pretrain-global"):
            raise ConfigError("inner-steps = 0: meta-learning needs at least one inner step")

    @property
    def resolved_server_optimizer(self) -> str:
        """`server-optimizer` with "auto" resolved: SGD for "average", Adam for "meta-gradient"."""
        if self.server_optimizer != "auto":
            return self.server_optimizer
        return "adam" if self.fusion == "meta-gradient" else "sgd"

    @property
    def resolved_server_lr(self) -> float:
        """`server-lr` with 0 resolved: 1.0 for SGD (plain averaging), 1e-3 for the adaptive optimizers."""
        if self.server_lr:
            return self.server_lr
        return 1.0 if self.resolved_server_optimizer == "sgd" else 1e-3

    @property
    def eval_query(self) -> int:
        """Query examples per evaluation task (per class for omniglot)."""
        if self.eval_query_shots:
            return self.eval_query_shots
        return 100 if self.task == "sinusoid" else self.query_shots

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, mapping: Mapping[str, Any]) -> Config:
        """Build from a run config (kebab- or snake-case keys); unknown keys and bad types raise."""
        by_field = {f.name: f for f in fields(cls)}
        kwargs: dict[str, Any] = {}
        for key, value in mapping.items():
            name = key.replace("-", "_")
            if name not in by_field:
                raise ConfigError(f"unknown config key {key!r}; known keys: "
                                  + ", ".join(sorted(_key(n) for n in by_field)))
            kwargs[name] = _coerce(key, value, by_field[name].default)
        return cls(**kwargs)

    def replace(self, **changes: Any) -> Config:
        return dataclasses.replace(self, **changes)

    def to_mapping(self) -> dict[str, Any]:
        """Kebab-case mapping (the run-config / ConfigRecord / config.json form)."""
        return {_key(f.name): getattr(self, f.name) for f in fields(self)}


def _key(name: str) -> str:
    return name.replace("_", "-")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """Accept a value of the default's type; ints are accepted (and widened) for float keys."""
    kind = type(default)
    if kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key {key!r} = {value!r} ({type(value).__name__}): expected {kind.__name__}")


# --- the run-config syntax of `flwr run --run-config` / `fedmeta run -c`: "key=value ...", values in TOML ---
def parse_run_config(items: list[str]) -> dict[str, Any]:
    """`k1=v1 k2="s"` strings -> dict, values parsed as TOML; a value that is not TOML raises ConfigError."""
    pairs = re.findall(r"(\S+?)=('[^']*'|\"[^\"]*\"|\S+)", " ".join(items))
    try:
        return tomllib.loads("\n".join(f'"{k}" = {v}' for k, v in pairs))
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"cannot parse run config {items!r}: {err}") from err


def toml_value(key: str, value: Any) -> str:
    """One run-config value in TOML; strings the `key=value` syntax cannot carry raise, naming the key."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)  # 0.001, 1e-06, inf, nan: all TOML floats
    if isinstance(value, str):
        if '"' in value or "'" in value or "\\" in value or "\n" in value:
            raise ConfigError(f"run-config key {key!r}: {value!r} holds a quote, backslash or newline, which the "
                              "`key=value` run-config syntax cannot carry")
        return f'"{value}"'
    raise ConfigError(f"run-config key {key!r}: cannot write {type(value).__name__} {value!r}")


def run_config_string(mapping: Mapping[str, Any]) -> str:
    """The `--run-config` string of a mapping (the inverse of `parse_run_config`)."""
    return " ".join(f"{k}={toml_value(k, v)}" for k, v in mapping.items())


def app_defaults(app: str | Path) -> dict[str, Any]:
    """The `[tool.flwr.app.config]` mapping of the Flower app in directory `app`."""
    with (Path(app) / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["tool"]["flwr"]["app"]["config"]
