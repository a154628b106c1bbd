"""Unknown names get a "did you mean"; allocations over the budget are refused with their size."""

import pytest

from moebase.limits import TooLargeError, check_alloc
from moebase.names import closest, unknown_name


def test_did_you_mean():
    assert closest("sn40l", ["dgx-h100", "sn40l-node"]) == "sn40l-node"  # a prefix
    assert closest("lruu", ["lru", "lfu", "belady"]) == "lru"  # a typo
    assert closest("zzz", ["lru", "lfu"]) is None
    assert unknown_name("system", "sn40l", ["sn40l-node", "dgx-h100"]) == (
        "unknown system 'sn40l'; did you mean 'sn40l-node'? known: dgx-h100, sn40l-node")
    assert unknown_name("policy", "zzz", ["lru"]) == "unknown policy 'zzz'; known: lru"


def test_check_alloc_names_the_size(monkeypatch):
    assert check_alloc("small", (1000, 8), 8) == 64_000
    with pytest.raises(TooLargeError, match=r"huge would need an array of 1,000,000,000 x 8 = 64\.0 GB"):
        check_alloc("huge", (10**9, 8), 8)
    monkeypatch.setenv("MOESIM_MAX_ARRAY_BYTES", "100")
    with pytest.raises(TooLargeError, match=r"limit 0\.0 GB"):
        check_alloc("small", (1000, 8), 8)
    monkeypatch.setenv("MOESIM_MAX_ARRAY_BYTES", "lots")
    with pytest.raises(TooLargeError, match="must be a number of bytes"):
        check_alloc("small", (1,), 1)
