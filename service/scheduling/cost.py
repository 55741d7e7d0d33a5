"""What an image costs the device, in seconds, by its batch key (size and decoder): seeded at warm-up,
refined by every batch.

Admission, the queue bound, `Retry-After` and the fair queue all count work in these seconds, so a
1024x1024 image weighs what it really costs next to a 64x64 one, not one image like any other.

Per key, the cost is a smoothed seconds-per-image over the batches that ran with that key (batch
time / images: what an image adds when the device is busy, which is when the estimates matter), so
full- and tiny-decoder batches keep their own estimates. A key never seen is scaled from the nearest
measured size with its decoder (any decoder, before one of its own is measured) by its area to the
power `exponent`, itself fitted from the measured sizes (clamped to [1, 2]: convolutions grow with the
area, attention with its square), so an unseen giant size is never cheap.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Iterable

from engine.types import BatchKey

_SMOOTHING = 0.2  # weight of a new batch in the running estimate
_DEFAULT_EXPONENT = 1.5  # before two sizes have been measured
_FLOOR_S = 1e-4  # no image is free: keeps ratios and Retry-After finite with a fake engine
_UNMEASURED_BATCH = 1.5  # a batch at a size never measured: its images at the busy rate, plus half


class CostModel:
    """Thread-safe: the device worker observes, the event loop estimates.

    Kept per key and per batch count, because a batch has a fixed part too: one image alone costs
    more than a quarter of a batch of four."""

    def __init__(self, prior_s: float = 0.05):
        self._prior_s = prior_s  # seconds per image before anything was measured
        self._batches: dict[BatchKey, dict[int, float]] = {}  # key -> images in the batch -> seconds
        self._lock = threading.Lock()

    def observe(self, key: BatchKey, images: int, seconds: float) -> None:
        """One batch of `images` with `key` took `seconds` on the device."""
        if images < 1 or seconds <= 0:
            return
        sample = max(seconds, _FLOOR_S * images)
        with self._lock:
            counts = self._batches.setdefault(key, {})
            old = counts.get(images)
            counts[images] = sample if old is None else (1 - _SMOOTHING) * old + _SMOOTHING * sample

    def seconds_per_image(self, key: BatchKey) -> float:
        """What an image adds when the device is busy: the largest batch measured with the key, per image."""
        per_image = self._per_image()
        if key in per_image:
            return per_image[key]
        if not per_image:
            return self._prior_s
        same_decoder = {k: v for k, v in per_image.items() if k.decoder == key.decoder}
        return max(_scaled(same_decoder or per_image, key), _FLOOR_S)

    def seconds(self, key: BatchKey, images: int) -> float:
        """Device time `images` images add to the queue (at the busy rate)."""
        return self.seconds_per_image(key) * images

    def batch_seconds(self, key: BatchKey, images: int) -> float:
        """How long one batch of `images` takes, from the closest measured batch with the key: a
        measured batch at least as large if there is one (a smaller batch is no slower), else the
        largest scaled up by images. An unmeasured key is scaled by area like `seconds_per_image`."""
        with self._lock:
            counts = dict(self._batches.get(key, {}))
        if not counts:
            return self.seconds(key, images) * _UNMEASURED_BATCH
        larger = [count for count in counts if count >= images]
        count = min(larger) if larger else max(counts)
        return counts[count] * max(1.0, images / count)

    def measured(self) -> dict[str, float]:
        """Seconds per image by "WxH" (and "WxH/DECODER" for a named decoder), for the logs."""
        return {
            f"{k.width}x{k.height}" + (f"/{k.decoder.value}" if k.decoder else ""): round(v, 6)
            for k, v in sorted(self._per_image().items(), key=lambda kv: (kv[0].width, kv[0].height))
        }

    def _per_image(self) -> dict[BatchKey, float]:
        with self._lock:
            return {key: counts[max(counts)] / max(counts) for key, counts in self._batches.items() if counts}

    def largest_images(self, key: BatchKey, budget_s: float) -> int:
        """How many images with `key` fit in `budget_s` of device time."""
        return int(budget_s // self.seconds_per_image(key))

    def largest_square(
        self, key: BatchKey, images: int, budget_s: float, multiple: int, limit: int
    ) -> int | None:
        """The largest square side (a multiple of `multiple`, at most `limit`) whose `images` (with the
        key's decoder) fit in the budget."""
        best = None
        side = multiple
        while side <= limit:
            if self.seconds(key._replace(width=side, height=side), images) <= budget_s:
                best = side
            side += multiple
        return best


def _scaled(per_image: dict[BatchKey, float], key: BatchKey) -> float:
    """The nearest measured size's cost, times the area ratio to the fitted exponent."""
    area = key.width * key.height
    nearest = min(per_image, key=lambda s: abs(math.log(s[0] * s[1] / area)))
    return per_image[nearest] * (area / (nearest.width * nearest.height)) ** _exponent(per_image.items())


def _exponent(measured: Iterable[tuple[BatchKey, float]]) -> float:
    """log(cost ratio) / log(area ratio) between the smallest and the largest measured size."""
    points = sorted((k.width * k.height, s) for k, s in measured)
    if len(points) < 2 or points[0][0] == points[-1][0]:
        return _DEFAULT_EXPONENT
    (a0, s0), (a1, s1) = points[0], points[-1]
    return min(2.0, max(1.0, math.log(s1 / s0) / math.log(a1 / a0)))
