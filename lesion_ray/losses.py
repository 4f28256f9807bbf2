"""The training losses, plain torch (usable without Ray)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field


class LossConfig(BaseModel):
    """``bce``: per-pixel BCE (tutorial). ``seed``: BCE - jaccard_weight * log(soft Jaccard) on the
    masks + head1_weight * BCE(head 1) + head2_weight * BCE(head 2) against "attribute present"."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: Literal["bce", "seed"] = Field("bce", description="bce (tutorial) or seed (multi-task loss)")
    jaccard_weight: float = Field(1.0, ge=0.0, description="seed: weight of -log(soft Jaccard)")
    head1_weight: float = Field(0.5, ge=0.0, description="seed: weight of head 1's BCE")
    head2_weight: float = Field(0.5, ge=0.0, description="seed: weight of head 2's BCE")


def soft_jaccard(logits: torch.Tensor, target: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """Soft Jaccard over the whole batch, as the seed computes it."""
    prob = torch.sigmoid(logits)
    intersection = (prob * target).sum()
    union = prob.sum() + target.sum()
    return (intersection + eps) / (union - intersection + eps)


def compute_loss(
    outputs: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    mask: torch.Tensor,
    present: torch.Tensor,
    config: LossConfig,
) -> torch.Tensor:
    """The configured loss of ``model(x)`` against masks ``[B, C, S, S]`` and labels ``[B, C]`` (0/1)."""
    logits, head1, head2 = (o.float() for o in outputs)  # losses in fp32 under autocast
    loss = F.binary_cross_entropy_with_logits(logits, mask)
    if config.name == "bce":
        return loss
    loss = loss - config.jaccard_weight * torch.log(soft_jaccard(logits, mask))
    loss = loss + config.head1_weight * F.binary_cross_entropy_with_logits(head1, present)
    return loss + config.head2_weight * F.binary_cross_entropy_with_logits(head2, present)
