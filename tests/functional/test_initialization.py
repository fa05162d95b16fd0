"""DATM's initialisation as pure functions: correct-sample selection with the next-expert
fallback, soft labels over the correct experts."""

from __future__ import annotations

import pytest
import torch

from lightning_distill.functional.initialization import (
    class_permutations,
    correct_sample_indices,
    soft_label_logits,
)


def _logits_fn(correct: dict[int, set[int]], num_classes: int = 3):
    """Expert e predicts the true class (the image's value) for the image ids in
    correct[e] and class (true + 1) % num_classes for every other image."""

    def fn(expert: int, images: torch.Tensor) -> torch.Tensor:
        ids = images[:, 0].long()
        true = images[:, 1].long()
        pred = torch.where(torch.tensor([int(i) in correct[expert] for i in ids]), true,
                           (true + 1) % num_classes)
        return torch.nn.functional.one_hot(pred, num_classes).float() * 5.0

    return fn


def _images(labels):
    n = len(labels)
    return torch.stack([torch.arange(n).float(), torch.tensor(labels).float()], 1)


def test_first_expert_with_enough_correct_images_supplies_them():
    labels = [0] * 8
    x = _images(labels)
    perm = torch.tensor([5, 2, 7, 0, 1, 3, 6, 4])
    fn = _logits_fn({0: {2}, 1: {7, 1, 6}, 2: {5, 2, 7, 0}})
    idx, used = correct_sample_indices(x, perm, 0, 3, [0, 1, 2], fn)
    # expert 0 has one correct image: go on; expert 1 has exactly 3, in permutation order
    assert used == 1 and idx.tolist() == [7, 1, 6]
    idx, used = correct_sample_indices(x, perm, 0, 3, [2, 0, 1], fn)
    assert used == 2 and idx.tolist() == [5, 2, 7]  # the first k in permutation order


def test_no_expert_has_enough_pads_the_best_with_misclassified():
    x = _images([1] * 6)
    perm = torch.tensor([3, 0, 5, 1, 4, 2])
    fn = _logits_fn({0: {4}, 1: {1, 2}})
    with pytest.warns(UserWarning, match="at most 2, expert 1, of 2 tried"):
        idx, used = correct_sample_indices(x, perm, 1, 4, [0, 1], fn, chunk=2)
    assert used == 1 and idx.tolist() == [1, 2, 3, 0]


def test_class_permutations_refuses_small_classes_and_draws_per_class():
    labels = torch.tensor([0, 1, 0, 1, 0, 2, 2])
    g = torch.Generator().manual_seed(0)
    perms = class_permutations(labels, 3, 2, g)
    g2 = torch.Generator().manual_seed(0)
    for c, p in enumerate(perms):
        idx = (labels == c).nonzero().flatten()
        assert torch.equal(p, idx[torch.randperm(idx.numel(), generator=g2)])
    with pytest.raises(ValueError, match="class 1 has only 2"):
        class_permutations(labels, 3, 3, torch.Generator().manual_seed(0))


def test_soft_labels_mean_over_correct_experts_by_hand():
    x = _images([0, 1, 2])
    fn_logits = {0: torch.tensor([[2.0, 0, 0], [0, 1.0, 3], [0, 0, 4.0]]),
                 1: torch.tensor([[1.0, 0, 0], [0, 2.0, 1], [5.0, 0, 1]]),
                 2: torch.tensor([[0.0, 3, 0], [1, 0.0, 2], [0, 1.0, 2]])}
    out = soft_label_logits(x, torch.tensor([0, 1, 2]), [0, 1, 2], lambda e, _: fn_logits[e])
    expected = torch.stack([
        (fn_logits[0][0] + fn_logits[1][0]) / 2,  # experts 0 and 1 right
        fn_logits[1][1],                          # only expert 1
        (fn_logits[0][2] + fn_logits[2][2]) / 2,  # experts 0 and 2
    ])
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
