"""A node's own state on its disk (FedSA-LoRA's B): per run, partition and round."""

from __future__ import annotations

import numpy as np
import pytest

from fedlora.node_state import KEEP, NodeStore


def test_a_node_reloads_the_newest_round_before_the_one_it_trains(tmp_path):
    store = NodeStore(tmp_path, "20261201-101010-abcd0123", 1)
    for r in (1, 2, 3):
        store.save(r, {"b": np.full((2, 3), float(r), np.float32)}, kept=r)
    files = sorted(p.name for p in store.folder.iterdir())
    assert len(files) == KEEP == 2
    assert files == ["round-000002.safetensors", "round-000003.safetensors"]
    state, kept = store.load(before=3)  # round 3 again (a dead server's round)
    assert kept == 2 and state.keys() == {"b"}
    np.testing.assert_array_equal(state["b"], np.full((2, 3), 2.0, np.float32))
    state, kept = store.load(before=9)
    assert kept == 3 and state["b"][0, 0] == 3.0
    assert store.load(before=2) is None  # round 1 was pruned
    other = NodeStore(tmp_path, "20261201-101010-abcd0123", 0)
    assert other.load(before=9) is None  # another partition
    assert NodeStore(tmp_path, "another-run", 1).load(before=9) is None


def test_a_run_id_that_is_not_a_plain_name_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a plain name"):
        NodeStore(tmp_path, "../escape", 0)
