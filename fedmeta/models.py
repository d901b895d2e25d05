"""The models of the papers, as plain `nn.Module`s whose parameters the algorithms handle as a dict.

- `mlp`: the 1-40-40-1 ReLU regressor of MAML's sinusoid experiment (Finn et al. 2017, §5.1).
- `conv4`: MAML's Omniglot network: 4 blocks of 3x3 conv (64 filters, stride 2), batch norm, ReLU,
  then the mean over space and a linear layer to `ways` logits. Batch norm always uses the
  statistics of the batch it sees (no running statistics), as in MAML's code, so a task's
  forward pass is a pure function of its parameters and inputs.
- `linear`: the bias-free linear optimizee of the quadratic problems (theta in R^dim).
- `optimizee`: a small sigmoid MLP (784-20-ways) classifying one Omniglot task, the optimizee of
  the LSTM meta-optimizer on images (Andrychowicz et al. 2016, §3.2 uses 20 sigmoid units on MNIST).
- `conv4-global`: `conv4` with one output per class of the family's global label space (3856 for
  the background alphabets with rotations), the classifier of `algorithm = "pretrain-global"`.

Which model a task and algorithm take is `fedmeta.tasks.families` (`model_name`).
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from .config import Config
from .tasks import families


class MLP(nn.Module):
    def __init__(self, sizes: tuple[int, ...] = (1, 40, 40, 1)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(sizes)):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)
        self.input_shape = (sizes[0],)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, in) -> (batch, out)
        return self.net(x)


class Conv4(nn.Module):
    def __init__(self, ways: int, channels: int = 64, in_channels: int = 1, image: int = 28) -> None:
        super().__init__()
        blocks: list[nn.Module] = []
        for i in range(4):
            blocks += [
                nn.Conv2d(in_channels if i == 0 else channels, channels, 3, stride=2, padding=1),
                nn.BatchNorm2d(channels, track_running_stats=False),
                nn.ReLU(),
            ]
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, ways)
        self.input_shape = (in_channels, image, image)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (batch, 1, 28, 28) -> (batch, ways)
        h = self.features(x)  # (batch, 64, 2, 2)
        return self.head(h.mean(dim=(2, 3)))


class Linear(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.theta = nn.Linear(dim, 1, bias=False)
        self.input_shape = (dim,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (rows, dim) -> (rows, 1)
        return self.theta(x)


class Optimizee(nn.Module):
    def __init__(self, ways: int, in_features: int = 28 * 28, hidden: int = 20) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Sigmoid(),
                                 nn.Linear(hidden, ways))
        self.input_shape = (1, 28, 28)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def build(name: str, cfg: Config | None = None) -> nn.Module:
    """Build a model by name with the sizes the config implies."""
    cfg = cfg or Config()
    if name == "mlp":
        return MLP()
    if name == "conv4":
        return Conv4(cfg.ways)
    if name == "linear":
        return Linear(cfg.quadratic_dim)
    if name == "optimizee":
        return Optimizee(cfg.ways)
    if name == "conv4-global":
        return Conv4(families.global_classes(cfg))
    raise ValueError(f"unknown model {name!r}; known: mlp, conv4, linear, optimizee, conv4-global")


def model_name(cfg: Config) -> str:
    """The model `cfg.algorithm` trains on `cfg.task` (the table of `fedmeta.tasks.families`)."""
    return families.model_name(cfg)


def params_of(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached copies of a module's parameters, the dict the algorithms work on."""
    return {k: v.detach().clone() for k, v in model.named_parameters()}
