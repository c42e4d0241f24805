"""Hypothesis settings shared by the fuzz tests of every parser of untrusted input.

By default each property runs a short, CI-sized number of examples. Setting
``LAZYSNAP_FUZZ_EXAMPLES`` (for instance to 100000) runs that many inputs through every one.
"""

from __future__ import annotations

import os
from datetime import timedelta

from hypothesis import HealthCheck, settings

EXAMPLES_VARIABLE = "LAZYSNAP_FUZZ_EXAMPLES"
# Every parser answers a small input in milliseconds: ten seconds for one means it hangs.
HANG_DEADLINE = timedelta(seconds=10)


def fuzz_examples(default: int) -> int:
    configured = os.environ.get(EXAMPLES_VARIABLE, "").strip()
    return int(configured) if configured else default


def fuzz_settings(default: int = 200) -> settings:
    """``default`` examples, or the number the environment asks for in the long mode."""
    return settings(
        max_examples=fuzz_examples(default),
        deadline=HANG_DEADLINE,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
