"""Retry timing for object-store calls: capped exponential backoff with full jitter.

The decision of *whether* to retry belongs to the adapter that knows the service's
error codes; this module only says *how long to wait* before attempt ``n``, as a pure
function of the attempt number and a random source, so tests can fix both.

Full jitter (``uniform(0, min(cap, base * 2**n))``) spreads a herd of clients that
were throttled together across the whole window instead of waking them in step, which
is what S3 asks for when it answers ``SlowDown`` (AWS Architecture Blog, "Exponential
Backoff And Jitter", 2015).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Backoff:
    """How many times to retry one call and how long to sleep between attempts."""

    retries: int = 8
    base_s: float = 0.05
    cap_s: float = 5.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, got {self.retries}")
        if self.base_s < 0 or self.cap_s < self.base_s:
            raise ValueError(f"need 0 <= base_s <= cap_s, got {self.base_s}, {self.cap_s}")

    @property
    def attempts(self) -> int:
        """The most attempts one call may make: the first plus the retries."""
        return self.retries + 1

    def delay_s(self, retry: int) -> float:
        """Seconds to sleep before retry number ``retry`` (0 for the first retry)."""
        return full_jitter(retry, self.base_s, self.cap_s, self.rng.random())


def full_jitter(retry: int, base_s: float, cap_s: float, unit: float) -> float:
    """``unit`` (in ``[0, 1)``) of the capped exponential window for ``retry``."""
    # min() before the power would still overflow for a huge retry count; clamp it.
    window = cap_s if retry >= 64 else min(cap_s, base_s * (2 ** retry))
    return unit * window
