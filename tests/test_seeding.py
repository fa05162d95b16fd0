"""Seeds derived from (seed, *keys): lightning_distill.seeding, and its old import paths."""

import numpy as np

from lightning_distill.seeding import derive_seed, expert_seeds


def test_derive_seed_is_the_seedsequence_hash():
    expected = int(np.random.SeedSequence([7, 3, 1]).generate_state(1)[0] >> 1)
    assert derive_seed(7, 3, 1) == expected
    assert 0 <= derive_seed(0) < 2**31
    assert derive_seed(7, 3) != derive_seed(7, 4) != derive_seed(8, 4)


def test_expert_seeds_are_three_derived_streams():
    assert expert_seeds(5, 2) == {"init": derive_seed(5, 2), "data": derive_seed(5, 2, 1),
                                  "dsa": derive_seed(5, 2, 2)}


def test_old_import_paths_still_work():
    from lightning_distill.stages.experts import dsa_flip_for
    from lightning_distill.stages.experts import expert_seeds as from_stage

    assert from_stage is expert_seeds
    assert dsa_flip_for("mnist") is False
