"""Host-to-device transfer: the next batches are copied while the current step runs."""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterator

import jax
import numpy as np

# Keys of a host batch that never go to the devices (the example ids, for the host's logs).
HOST_ONLY_KEYS = ("index",)


def to_devices(batch: dict[str, np.ndarray], sharding: jax.sharding.Sharding) -> dict[str, jax.Array]:
    """This process's rows of a global batch as global arrays over ``sharding``; images stay uint8 (the
    step converts them), host-only keys stay behind."""
    return {
        k: jax.make_array_from_process_local_data(sharding, v)
        for k, v in batch.items()
        if k not in HOST_ONLY_KEYS
    }


def prefetch_to_device(batches: Iterator, put: Callable, size: int = 2) -> Iterator:
    """Puts the next ``size`` batches on the devices ahead of use (host->device copies overlap the step)."""
    queue: collections.deque = collections.deque()
    for batch in batches:
        queue.append(put(batch))
        if len(queue) >= size:
            yield queue.popleft()
    while queue:
        yield queue.popleft()
