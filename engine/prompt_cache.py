"""The prompt-embedding cache: the text encoder's output for a prompt's token ids, kept LRU.

A prompt encodes to the same states whatever else is in its batch, so a repeated prompt (a client's
retry, a popular prompt, n > 1) skips the text encoder. Entries are the encoder's own output rows,
copied out of its buffers (a CUDA graph overwrites its output on the next replay) and kept on its
device. Bounded in entries: one costs seq_len x hidden x bytes per value — 77 x 1024 x 2 = 158 KB for
SD2.1-base in fp16 (77 x 768 x 2 = 118 KB for SD1.5), so the default 1024 entries hold at most 161 MB.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

Key = tuple[int, ...]


class PromptCache:
    """LRU of token ids -> prompt states [L, D], for one model; `hits` and `misses` count the distinct
    prompts of each batch (a padded batch's copies and a request's n images count once)."""

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"the prompt cache holds 0 or more entries, got {capacity}")
        self.capacity = capacity
        self.hits = 0
        self.misses = 0
        self._entries: OrderedDict[Key, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()  # the device thread writes; a metrics scrape reads the counters

    def __len__(self) -> int:
        return len(self._entries)

    def encode(self, ids: torch.Tensor, encoder: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """States [B, L, D] for token ids [B, L]: cached rows as they are, the others (each distinct row
        once) from `encoder`, which is given them as one batch [M, L] and returns [M, L, D]."""
        if self.capacity == 0:
            return encoder(ids)
        keys = [tuple(row) for row in ids.tolist()]
        with self._lock:
            found = {k: self._entries[k] for k in keys if k in self._entries}
            for k in found:
                self._entries.move_to_end(k)
            missing = list(dict.fromkeys(k for k in keys if k not in found))
            self.hits += len(found)
            self.misses += len(missing)
        if missing:
            states = encoder(torch.tensor(missing, dtype=ids.dtype))
            fresh = {k: states[i].clone() for i, k in enumerate(missing)}
            with self._lock:
                for k, value in fresh.items():
                    self._entries[k] = value
                    self._entries.move_to_end(k)
                while len(self._entries) > self.capacity:
                    self._entries.popitem(last=False)
            found.update(fresh)
        return torch.stack([found[k] for k in keys])

    def stats(self) -> tuple[int, int]:
        """(hits, misses) so far, in rows."""
        with self._lock:
            return self.hits, self.misses
