"""Host-to-device prefetch: the next batches are copied while the current step runs."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator


def prefetch_to_device(batches: Iterator, put: Callable, size: int = 2) -> Iterator:
    """Puts the next ``size`` batches on the devices ahead of use (host->device copies overlap the step)."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
