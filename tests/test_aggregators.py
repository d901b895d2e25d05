"""Weight policies and robust aggregators on hand-made updates, every expected value by hand.

The updates, as the concatenation (w[0], w[1], b[0]) over which norms and distances are taken:
    d1 = (1, 0, 0)    ||d1|| = 1
    d2 = (2, 2, 1)    ||d2|| = 3
    d3 = (0, 4, 3)    ||d3|| = 5
    d4 = (-6, 8, 0)   ||d4|| = 10       claimed weights 1, 1, 2, 4
    d5 = (7, 1, -2)                     (the five-reply cases), claimed weight 2
"""

import pytest
import torch

from strategies import aggregators as agg
from strategies.aggregators import FusionError


def upd(w0, w1, b):
    return {"w": torch.tensor([w0, w1], dtype=torch.float64), "b": torch.tensor([b], dtype=torch.float64)}


D = [upd(1, 0, 0), upd(2, 2, 1), upd(0, 4, 3), upd(-6, 8, 0)]
W = [1.0, 1.0, 2.0, 4.0]
D5, W5 = D + [upd(7, 1, -2)], W + [2.0]


def expect(out, w0, w1, b, exact=True):
    got = torch.cat([out["w"], out["b"]])
    want = torch.tensor([w0, w1, b], dtype=torch.float64)
    assert torch.equal(got, want) if exact else torch.allclose(got, want, rtol=0, atol=1e-12), (got, want)


def test_weight_policies_by_hand():
    assert agg.claimed(W) == [1, 1, 2, 4]
    assert agg.equal(W) == [1, 1, 1, 1]
    # median claim of (1, 1, 2, 4) = (1 + 2) / 2 = 1.5; cap 2 -> limit 3: the 4 becomes 3
    assert agg.capped(W, 2.0) == [1, 1, 2, 3]
    # odd count: median of (1, 1, 2, 4, 100) = 2; cap 3 -> limit 6
    assert agg.capped([1, 1, 2, 4, 100], 3.0) == [1, 1, 2, 4, 6]


def test_weighted_mean_under_each_policy():
    # claimed (1, 1, 2, 4), total 8: w0 = (1 + 2 + 0 - 24) / 8, w1 = (0 + 2 + 8 + 32) / 8, b = (0 + 1 + 6 + 0) / 8
    expect(agg.weighted_average(list(zip(D, W))), -21 / 8, 42 / 8, 7 / 8)
    # equal, total 4: w0 = (1 + 2 + 0 - 6) / 4, w1 = (0 + 2 + 4 + 8) / 4, b = (0 + 1 + 3 + 0) / 4
    expect(agg.weighted_average(list(zip(D, agg.equal(W)))), -3 / 4, 14 / 4, 1)
    # capped at 2 x median = 3: (1, 1, 2, 3), total 7: w0 = (1 + 2 - 18) / 7, w1 = (2 + 8 + 24) / 7, b = 7 / 7
    expect(agg.weighted_average(list(zip(D, agg.capped(W, 2.0)))), -15 / 7, 34 / 7, 1, exact=False)


def test_median_is_coordinatewise_and_unweighted():
    # four replies: the mean of the two middle values per coordinate
    # w0: (-6, 0, 1, 2) -> 0.5; w1: (0, 2, 4, 8) -> 3; b: (0, 0, 1, 3) -> 0.5; the weights play no part
    expect(agg.median(list(zip(D, W))), 0.5, 3, 0.5)
    expect(agg.median(list(zip(D, [100.0, 1, 1, 1]))), 0.5, 3, 0.5)
    # three replies d1..d3: w0 (0, 1, 2) -> 1; w1 (0, 2, 4) -> 2; b (0, 1, 3) -> 1
    expect(agg.median(list(zip(D[:3], W))), 1, 2, 1)
    assert agg.median([(upd(1, 2, 3), 1.0)] * 3)["w"].dtype == torch.float64  # the input's dtype
    with pytest.raises(FusionError, match="at least 3 replies, got 2"):
        agg.median(list(zip(D[:2], W)))


def test_trimmed_mean_drops_floor_beta_n_at_each_end():
    # n = 5, beta = 0.2: drop floor(1.0) = 1 smallest and 1 largest per coordinate, mean of the middle 3
    # w0: (-6, 0, 1, 2, 7) -> (0 + 1 + 2) / 3 = 1; w1: (0, 1, 2, 4, 8) -> (1 + 2 + 4) / 3 = 7/3;
    # b: (-2, 0, 0, 1, 3) -> (0 + 0 + 1) / 3 = 1/3
    expect(agg.trimmed_mean(list(zip(D5, W5)), 0.2), 1, 7 / 3, 1 / 3, exact=False)
    # beta = 0.4: floor(2.0) = 2 per side leaves the median: w0 1, w1 2, b 0
    expect(agg.trimmed_mean(list(zip(D5, W5)), 0.4), 1, 2, 0)
    # beta = 0 is the unweighted mean: w0 (1 + 2 + 0 - 6 + 7) / 5 = 4/5, w1 15/5, b 2/5
    expect(agg.trimmed_mean(list(zip(D5, W5)), 0.0), 4 / 5, 3, 2 / 5, exact=False)
    assert agg.trim_count(100, 0.29) == 29 and agg.trim_count(9, 0.1) == 0 and agg.min_trimmed(0.1) == 10
    with pytest.raises(FusionError, match=r"trims floor\(0.1 x 5\) = 0 .* at least 10 replies, got 5"):
        agg.trimmed_mean(list(zip(D5, W5)), 0.1)


def test_clipped_mean_clips_to_a_multiple_of_the_median_norm():
    # norms (1, 3, 5, 10), median (3 + 5) / 2 = 4; multiple 1.5 -> bound 6: d4 is scaled by 6/10 to (-3.6, 4.8, 0)
    clipped, count = agg.clip_to_median_norm(list(zip(D, W)), 1.5)
    assert count == 1 and [w for _, w in clipped] == W
    expect(clipped[3][0], -3.6, 4.8, 0, exact=False)
    assert clipped[0][0] is D[0]  # untouched replies are passed through
    # weighted mean, weights (1, 1, 2, 4), total 8: w0 = (1 + 2 + 0 - 14.4) / 8 = -1.425,
    # w1 = (0 + 2 + 8 + 19.2) / 8 = 3.65, b = (0 + 1 + 6 + 0) / 8 = 0.875
    expect(agg.clipped_mean(list(zip(D, W)), 1.5), -1.425, 3.65, 0.875, exact=False)
    # a multiple above every norm / median ratio (10 / 4 = 2.5) clips nothing: the weighted mean
    expect(agg.clipped_mean(list(zip(D, W)), 2.5), -21 / 8, 42 / 8, 7 / 8)
    with pytest.raises(FusionError, match="at least 3"):
        agg.clipped_mean(list(zip(D[:2], W)), 1.5)


def test_krum_scores_and_selection_by_hand():
    # squared distances: |d1-d2|^2 = 1+4+1 = 6, |d1-d3|^2 = 1+16+9 = 26, |d1-d4|^2 = 49+64+0 = 113,
    # |d2-d3|^2 = 4+4+4 = 12, |d2-d4|^2 = 64+36+1 = 101, |d3-d4|^2 = 36+16+9 = 61
    # f = 0: the n - f - 2 = 2 nearest: s1 = 6+26, s2 = 6+12, s3 = 12+26, s4 = 61+101
    assert agg.krum_scores(list(zip(D, W)), 0) == [32, 18, 38, 162]
    expect(agg.krum(list(zip(D, W)), 0, 1), 2, 2, 1)  # Krum: d2
    # multi-Krum m = 3: d2, d1, d3 (18, 32, 38) with weights 1, 1, 2: w0 = 3/4, w1 = 10/4, b = 7/4
    assert agg.krum_selection(list(zip(D, W)), 0, 3) == [0, 1, 2]
    expect(agg.krum(list(zip(D, W)), 0, 3), 3 / 4, 10 / 4, 7 / 4)
    # five replies, f = 1: still 2 neighbours; |d5 - d1..d4|^2 = 41, 35, 83, 222
    # s = (6+26, 6+12, 12+26, 61+101, 35+41) = (32, 18, 38, 162, 76); m = 0 -> n - f = 4 drops d4
    assert agg.krum_scores(list(zip(D5, W5)), 1) == [32, 18, 38, 162, 76]
    assert agg.krum_selection(list(zip(D5, W5)), 1, 0) == [0, 1, 2, 4]
    # weights 1, 1, 2, 2 (total 6): w0 = (1 + 2 + 0 + 14) / 6, w1 = (0 + 2 + 8 + 2) / 6, b = (0 + 1 + 6 - 4) / 6
    expect(agg.krum(list(zip(D5, W5)), 1, 0), 17 / 6, 2, 0.5, exact=False)
    assert agg.krum_selection(list(zip(D5, W5)), 1, 5) == [0, 1, 2, 4]  # m capped at n - f
    with pytest.raises(FusionError, match=r"n > 2f \+ 2\) needs at least 5 replies, got 4"):
        agg.krum(list(zip(D, W)), 1)


def test_norms_do_not_overflow_in_float32():
    big = {"w": torch.tensor([1e25, 1e25], dtype=torch.float32), "b": torch.tensor([0.0])}
    assert agg.update_norm(big) == pytest.approx(1e25 * 2**0.5, rel=1e-6)  # float32 squares would be inf
