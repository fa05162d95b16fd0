"""Seeds derived from a base seed and integer keys, the same on every platform and run.

Every random stream of the package is seeded from ``(seed, *keys)`` rather than from
the clock or from what ran before it in the process (docs/design.md, section
'Decisions'): expert i of a store, rank r of a distillation, run r of an evaluation.
"""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed", "expert_seeds"]


def derive_seed(seed: int, *keys: int) -> int:
    """A 31-bit seed derived from ``(seed, *keys)``: expert i uses derive_seed(seed, i).

    Independent streams for different keys (numpy's SeedSequence hashing), and the same
    value on every platform and run.
    """
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(1)[0] >> 1)


def expert_seeds(seed: int, index: int) -> dict[str, int]:
    """The seeds of expert ``index``: ``init`` (global RNGs: initialisation, and the
    DistributedSampler under DDP), ``data`` (training order), ``dsa`` (augmentation).

    They depend on ``(seed, index)`` alone (docs/method.md, section 'Expert
    trajectories'), so an expert is the same in any shard, order or resumed run.
    """
    return {
        "init": derive_seed(seed, index),
        "data": derive_seed(seed, index, 1),
        "dsa": derive_seed(seed, index, 2),
    }
