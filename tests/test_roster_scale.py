"""The roster's partition lists with assign-partitions are ranges (a per-partition test took 4 ms at 10 000
partitions, several times a round): the same lists as the held-out rule, at every size, held-out count and
before any node connected."""

import pytest

from fedmeta.config import Config
from strategies.roster import Roster


@pytest.mark.parametrize("nodes,heldout,partitions", [(4, 2, 4), (3, 5, 3), (7, 0, 7), (3, 2, 10), (1, 1, 1)])
def test_assigned_partition_lists_follow_the_heldout_rule(nodes, heldout, partitions):
    r = Roster(Config(heldout_partitions=heldout))
    r.num_partitions = partitions
    assert r.training() == [] and r.heldout() == []  # no node connected yet
    r._nodes = list(range(100, 100 + nodes))  # what `refresh` found
    assert r.training() == [p for p in range(partitions) if not r.is_heldout(p)]
    assert r.heldout() == [p for p in range(partitions) if r.is_heldout(p)]
    assert r.training() + r.heldout() == list(range(partitions))
