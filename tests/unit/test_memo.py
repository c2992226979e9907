from nexus_extproc.memo import BoundedMemo


def test_bounded_memo_drops_everything_at_its_bound_and_tells_derived_caches():
    cleared: list[int] = []
    memo: BoundedMemo[int, str] = BoundedMemo(limit=3, on_clear=lambda: cleared.append(len(memo)))
    for i in range(3):
        assert memo.put(i, str(i)) == str(i)
    assert len(memo) == 3 and cleared == []
    memo.put(3, "3")
    assert dict(memo) == {3: "3"} and cleared == [0]
