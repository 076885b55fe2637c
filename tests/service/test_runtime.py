"""settle_gc freezes what start-up built and raises only the youngest generation's threshold."""

from __future__ import annotations

import gc

from service.runtime import settle_gc


def test_settle_gc_freezes_and_sets_gen0_threshold() -> None:
    before, frozen_before = gc.get_threshold(), gc.get_freeze_count()
    gc.unfreeze()  # an API test earlier in the session may have settled this process already
    assert gc.get_freeze_count() == 0
    keep = [[i] for i in range(1000)]  # start-up objects
    try:
        settle_gc(12_345)
        assert gc.get_threshold() == (12_345, before[1], before[2])
        assert gc.get_freeze_count() >= len(keep)
        settle_gc(0)  # 0 keeps whatever threshold is set
        assert gc.get_threshold()[0] == 12_345
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
        if frozen_before:
            gc.freeze()
