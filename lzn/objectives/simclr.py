"""The SimCLR baseline for case study 2: same encoder, augmentations and budget as LZN,
NT-Xent on the head's outputs with the negatives of the global batch."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from lzn.distributed import global_indices
from lzn.objectives.base import ObjectiveModule


def nt_xent(p1: Tensor, p2: Tensor, all1: Tensor, all2: Tensor, offset: Tensor, temperature: float) -> Tensor:
    """NT-Xent of local projections p1, p2 (b, d) against the gathered all1, all2 (B, d).

    offset: (b,) global indices of the local rows. Each view's positive is the other view
    of the same image; the other 2B - 2 projections are negatives.
    """
    q = nn.functional.normalize(torch.cat([p1, p2]), dim=1)  # (2b, d)
    k = nn.functional.normalize(torch.cat([all1, all2]), dim=1)  # (2B, d)
    n = all1.shape[0]
    logits = q @ k.t() / temperature
    rows = torch.arange(2 * p1.shape[0], device=q.device)
    own = torch.cat([offset, offset + n])
    logits[rows, own] = float("-inf")  # a projection is not its own negative
    positive = torch.cat([offset + n, offset])
    return nn.functional.cross_entropy(logits, positive)


class SimCLRObjective(ObjectiveModule):
    def __init__(self, encoder: nn.Module, temperature: float = 0.5, gather=None):
        super().__init__(gather)
        self.encoder, self.temperature = encoder, temperature

    def loss(self, batch: dict) -> tuple[Tensor, dict[str, Tensor]]:
        v1, v2 = batch["views"]
        p1, p2 = self.encoder(v1), self.encoder(v2)
        offset = global_indices(p1.shape[0], device=p1.device)
        loss = nt_xent(p1, p2, self.gather(p1), self.gather(p2), offset, self.temperature)
        return loss, {"loss/nt_xent": loss.detach()}
