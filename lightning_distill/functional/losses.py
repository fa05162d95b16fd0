"""Classification losses used in the inner loop and in evaluation.

Hard labels (class ids) use the ordinary cross-entropy; DATM's learnable soft labels
(logits) use DATM's soft cross-entropy (Guo et al., ICLR 2024; docs/method.md, section
'Soft labels and initialisation').
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import InputError

__all__ = ["classification_loss", "soft_cross_entropy"]


def soft_cross_entropy(logits: Tensor, target_logits: Tensor) -> Tensor:
    """SoftCE(out, Y) = mean_b sum_k -log_softmax(out)_bk * softmax(Y)_bk (DATM soft labels).

    ``target_logits`` are raw logits (DATM stores learnable labels as logits); the
    gradient flows into both arguments.
    """
    if logits.shape != target_logits.shape or logits.dim() != 2:
        raise InputError(
            f"soft_cross_entropy: logits {tuple(logits.shape)} and target_logits "
            f"{tuple(target_logits.shape)} must both be [B, K] with the same shape"
        )
    # float32 at least (under autocast the logits arrive in bfloat16): the soft labels'
    # softmax and the log-probabilities keep their precision (docs/method.md, 'Mixed precision')
    dtype = torch.promote_types(logits.dtype, torch.float32)
    log_p = F.log_softmax(logits.to(dtype), dim=1)
    q = F.softmax(target_logits.to(dtype), dim=1)
    return -(q * log_p).sum(dim=1).mean()


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy dispatched on the labels.

    Integer labels [B] -> ``F.cross_entropy`` (mean over the batch); floating labels
    [B, K] -> :func:`soft_cross_entropy` with ``softmax(labels)`` as targets.
    """
    if not labels.is_floating_point():
        if labels.dim() != 1:
            raise InputError(
                f"classification_loss: hard labels must be [B] class ids, got shape "
                f"{tuple(labels.shape)}"
            )
        return F.cross_entropy(logits, labels.long())
    if labels.dim() != 2:
        raise InputError(
            f"classification_loss: floating labels must be [B, K] logits, got shape "
            f"{tuple(labels.shape)}; pass class ids as an integer tensor"
        )
    return soft_cross_entropy(logits, labels)
