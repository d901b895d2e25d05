"""Robust aggregation of per-reply updates, pure functions over [(d_i, w_i)] in partition order.

A client's weight and update are its own claims, so the server may trust neither. The pieces:

- weight policies (`claimed`, `equal`, `capped`) turn the claimed weights into the weights used;
- aggregators turn the updates d_i (dicts of tensors, all with the same keys and shapes) into one:
  `weighted_average` (the plain mean), `median` and `trimmed_mean` (coordinate-wise, Yin et al.
  2018, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates"),
  `clipped_mean` (each update's norm clipped to a multiple of the round's median norm, then the
  weighted mean), and (multi-)`krum` (Blanchard et al. 2017, "Machine Learning with Adversaries:
  Byzantine Tolerant Gradient Descent").

Norms and distances are taken over the concatenation of all tensors of a reply, in float64 (a
finite float32 of 1e25 squares to inf in float32). Every robust aggregator refuses (FusionError)
fewer replies than it needs to be robust at all, rather than silently degrading to the mean: the
strategy then leaves the model unchanged for the round. `min_replies` states each minimum once;
`strategies.fusion.check_preconditions` applies it at start-up.
"""

from __future__ import annotations

import math
import statistics

import torch

from fedmeta.optim import Params

Updates = list[tuple[Params, float]]  # (d_i, w_i) in partition order


class FusionError(ValueError):
    """This round's replies cannot be fused (too few for the aggregator, or a non-finite result);
    the message says why and the model stays unchanged."""


# --- weight policies --------------------------------------------------------------------------
def claimed(weights: list[float]) -> list[float]:
    """The weights as the clients claimed them (FedAvg, McMahan et al. 2017)."""
    return list(weights)


def equal(weights: list[float]) -> list[float]:
    """Every reply counts once, whatever it claims."""
    return [1.0] * len(weights)


def capped(weights: list[float], cap: float) -> list[float]:
    """Claims capped at `cap` x the round's median claim (median of the two middle claims when the
    count is even), so that one client claiming 100 x the others' weight counts `cap` x at most."""
    limit = cap * statistics.median(weights)
    return [min(w, limit) for w in weights]


# --- helpers ----------------------------------------------------------------------------------
def flat(update: Params) -> torch.Tensor:
    """All tensors of one reply as one float64 vector (in the dict's key order)."""
    return torch.cat([v.reshape(-1).to(torch.float64) for v in update.values()])


def update_norm(update: Params) -> float:
    """||d|| over the concatenation of all tensors, in float64."""
    return float(torch.linalg.vector_norm(flat(update)))


def _require(n: int, need: int, what: str) -> None:
    if n < need:
        raise FusionError(f"{what} needs at least {need} replies, got {n}")


def _stacked(updates: Updates, key: str) -> torch.Tensor:
    """Tensor `key` of every reply stacked: (n, *shape), float64."""
    return torch.stack([d[key].to(torch.float64) for d, _ in updates])


# --- aggregators ------------------------------------------------------------------------------
def weighted_average(updates: Updates) -> Params:
    """sum_i w_i u_i / sum_i w_i, accumulated in float64 and cast back to each tensor's dtype."""
    if not updates:
        raise FusionError("nothing to average")
    total = math.fsum(w for _, w in updates)
    first = updates[0][0]
    out = {}
    for k, ref in first.items():
        acc = torch.zeros(ref.shape, dtype=torch.float64)
        for params, w in updates:
            acc += params[k].to(torch.float64) * (w / total)
        out[k] = acc.to(ref.dtype)
    return out


def median(updates: Updates) -> Params:
    """Coordinate-wise median, UNWEIGHTED (Yin et al. 2018): the claimed weights are ignored, since
    a weighted median would hand the coordinate to whoever claims half the total weight. With an
    even count it is the mean of the two middle values. Needs 3 replies (of 2 it is their mean)."""
    n = len(updates)
    _require(n, 3, "the coordinate-wise median")
    out = {}
    for k, ref in updates[0][0].items():
        s = _stacked(updates, k).sort(dim=0).values
        out[k] = ((s[(n - 1) // 2] + s[n // 2]) / 2).to(ref.dtype)
    return out


def trim_count(n: int, beta: float) -> int:
    """floor(beta * n): replies dropped at EACH end (1e-9 guards 0.29 * 100 = 28.999...)."""
    return math.floor(beta * n + 1e-9)


def trimmed_mean(updates: Updates, beta: float) -> Params:
    """Coordinate-wise beta-trimmed mean (Yin et al. 2018), UNWEIGHTED: per coordinate drop the
    floor(beta n) smallest and largest values and average the remaining n - 2 floor(beta n).
    beta > 0 that trims nothing (floor(beta n) = 0) is refused: it would be the plain mean."""
    n, k = len(updates), trim_count(len(updates), beta)
    _require(n, 1, "the trimmed mean")
    if beta > 0 and k == 0:
        raise FusionError(f"the trimmed mean with fraction {beta} trims floor({beta} x {n}) = 0 replies per side: "
                          f"it needs at least {min_trimmed(beta)} replies, got {n}")
    if n <= 2 * k:
        raise FusionError(f"the trimmed mean drops {k} replies at each end of {n}: nothing is left")
    out = {}
    for k_, ref in updates[0][0].items():
        s = _stacked(updates, k_).sort(dim=0).values
        out[k_] = s[k:n - k].mean(dim=0).to(ref.dtype)
    return out


def min_trimmed(beta: float) -> int:
    """The fewest replies for which the beta-trimmed mean trims at least one per side."""
    n = 1
    while trim_count(n, beta) < 1:
        n += 1
    return n


def clip_to_median_norm(updates: Updates, multiple: float) -> tuple[Updates, int]:
    """Each d_i scaled by min(1, multiple x median_j ||d_j|| / ||d_i||); also returns how many were
    scaled. The median norm comes from the round itself, so no attacker moves the bound alone
    while honest replies are the majority."""
    norms = [update_norm(d) for d, _ in updates]
    bound = multiple * statistics.median(norms)
    out, clipped = [], 0
    for (d, w), norm in zip(updates, norms):
        if norm > bound:
            clipped += 1
            scale = bound / norm
            d = {k: (v.to(torch.float64) * scale).to(v.dtype) for k, v in d.items()}
        out.append((d, w))
    return out, clipped


def clipped_mean(updates: Updates, multiple: float) -> Params:
    """The weighted mean of the median-norm-clipped updates (clipping as in DP-FedAvg, McMahan et
    al. 2018, with the bound taken from the round's median). Needs 3 replies: with 2, an attacker
    moves the median norm itself."""
    _require(len(updates), 3, "the norm-clipped mean")
    return weighted_average(clip_to_median_norm(updates, multiple)[0])


def krum_scores(updates: Updates, f: int) -> list[float]:
    """Krum score of each reply: the sum of squared distances to its n - f - 2 nearest others."""
    n = len(updates)
    _require(n, 2 * f + 3, f"Krum with {f} Byzantine replies (n > 2f + 2)")
    x = torch.stack([flat(d) for d, _ in updates])  # (n, P) float64
    # squared distances row by row (not cdist, whose matmul form loses digits): (n, n)
    dist = torch.stack([(x - x[i]).square().sum(dim=1) for i in range(n)])
    dist.fill_diagonal_(math.inf)  # a reply is not its own neighbour
    return [float(v) for v in dist.sort(dim=1).values[:, :n - f - 2].sum(dim=1)]


def krum_selection(updates: Updates, f: int, m: int) -> list[int]:
    """Indices (in partition order) of the m best-scored replies; m = 0 means n - f, and m is
    capped at n - f so that a round with fewer replies than planned never selects more than the
    honest count. Ties go to the earlier partition (a stable sort)."""
    scores = krum_scores(updates, f)
    m = min(m or len(updates) - f, len(updates) - f)
    best = sorted(range(len(updates)), key=lambda i: scores[i])[:m]
    return sorted(best)


def krum(updates: Updates, f: int, m: int = 1) -> Params:
    """(Multi-)Krum (Blanchard et al. 2017; El Mhamdi et al. 2018): the weighted mean (policy
    weights) of the m replies with the lowest Krum scores. m = 1 is Krum itself."""
    return weighted_average([updates[i] for i in krum_selection(updates, f, m)])
