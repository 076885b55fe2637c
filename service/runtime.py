"""Process tuning applied once a process has built what it keeps for its lifetime (API start-up, worker fork)."""

from __future__ import annotations

import gc


def settle_gc(gen0_threshold: int) -> None:
    """Move everything built so far out of the collector's way, then collect the youngest generation less often.

    ``gc.freeze()`` keeps the start-up objects (mappings, models, compiled statements) out of every later
    collection. A request or task allocates thousands of short-lived containers (a parsed FHIR body); with the
    interpreter's default threshold of 700 they trigger several collections each, which cost about a tenth of
    the CPU and make most of the latency tail. The request's objects hold few reference cycles, so collecting
    less often costs little memory. ``gen0_threshold`` 0 keeps the interpreter's threshold.
    """
    gc.collect()
    gc.freeze()
    if gen0_threshold > 0:
        _, gen1, gen2 = gc.get_threshold()
        gc.set_threshold(gen0_threshold, gen1, gen2)
