"""What an image costs the device, in seconds, by its size: seeded at warm-up, refined by every batch.

Admission, the queue bound, `Retry-After` and the fair queue all count work in these seconds, so a
1024x1024 image weighs what it really costs next to a 64x64 one, not one image like any other.

Per size, the cost is a smoothed seconds-per-image over the batches that ran at that size (batch
time / images: what an image adds when the device is busy, which is when the estimates matter).
A size never seen is scaled from the nearest measured one by its area to the power `exponent`,
itself fitted from the measured sizes (clamped to [1, 2]: convolutions grow with the area, attention
with its square), so an unseen giant size is never cheap.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

Size = tuple[int, int]

_SMOOTHING = 0.2  # weight of a new batch in the running estimate
_DEFAULT_EXPONENT = 1.5  # before two sizes have been measured
_FLOOR_S = 1e-4  # no image is free: keeps ratios and Retry-After finite with a fake engine


class CostModel:
    """Thread-safe: the device worker observes, the event loop estimates."""

    def __init__(self, prior_s: float = 0.05):
        self._prior_s = prior_s  # seconds per image before anything was measured
        self._per_image: dict[Size, float] = {}
        self._lock = threading.Lock()

    def observe(self, size: Size, images: int, seconds: float) -> None:
        """One batch of `images` at `size` took `seconds` on the device."""
        if images < 1 or seconds <= 0:
            return
        sample = max(seconds / images, _FLOOR_S)
        with self._lock:
            old = self._per_image.get(size)
            self._per_image[size] = sample if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * sample

    def seconds_per_image(self, size: Size) -> float:
        with self._lock:
            measured = dict(self._per_image)
        if size in measured:
            return measured[size]
        if not measured:
            return self._prior_s
        area = size[0] * size[1]
        nearest = min(measured, key=lambda s: abs(math.log(s[0] * s[1] / area)))
        ratio = area / (nearest[0] * nearest[1])
        return max(measured[nearest] * ratio ** _exponent(measured.items()), _FLOOR_S)

    def seconds(self, size: Size, images: int) -> float:
        return self.seconds_per_image(size) * images

    def measured(self) -> dict[str, float]:
        """Seconds per image by "WxH", for /readyz and the logs."""
        with self._lock:
            return {f"{w}x{h}": round(s, 6) for (w, h), s in sorted(self._per_image.items())}

    def largest_images(self, size: Size, budget_s: float) -> int:
        """How many images of `size` fit in `budget_s` of device time."""
        return int(budget_s // self.seconds_per_image(size))

    def largest_square(self, images: int, budget_s: float, multiple: int, limit: int) -> int | None:
        """The largest square side (a multiple of `multiple`, at most `limit`) whose `images` fit in the budget."""
        best = None
        side = multiple
        while side <= limit:
            if self.seconds((side, side), images) <= budget_s:
                best = side
            side += multiple
        return best


def _exponent(measured: Iterable[tuple[Size, float]]) -> float:
    """log(cost ratio) / log(area ratio) between the smallest and the largest measured size."""
    points = sorted((w * h, s) for (w, h), s in measured)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return _DEFAULT_EXPONENT
    (a0, s0), (a1, s1) = points[0], points[-1]
    return min(2.0, max(1.0, math.log(s1 / s0) / math.log(a1 / a0)))
