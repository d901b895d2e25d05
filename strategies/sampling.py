"""Which training partitions a round samples: one pure, seeded rule shared by every caller."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

from fedmeta import seeding


def sample_clients(seed: int, server_round: int, candidates: Sequence[int], fraction: float,
                   minimum: int) -> list[int]:
    """`max(minimum, ceil(fraction * n))` of the `n` candidates (at most all), drawn without replacement
    from the seeded "client-sampling" stream of `server_round`, returned sorted.

    Candidates are partition ids: the draw depends on the run seed, the round and the candidate set
    only, never on node ids or arrival order, so the same seed samples the same partitions in a
    simulation of any size and in a resumed run.
    """
    pool = sorted(candidates)
    k = min(len(pool), max(minimum, math.ceil(fraction * len(pool))))
    rng = random.Random(seeding.derive(seed, "client-sampling", server_round))
    return sorted(rng.sample(pool, k))
