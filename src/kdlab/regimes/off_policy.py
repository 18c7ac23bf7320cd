"""Off-policy KD: train on the dataset's own completions (the default regime)."""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.data.collate import Encoded
from kdlab.regimes.base import REGIMES, Regime, RegimeContext


def global_order(num_examples: int, seed: int, epoch: int) -> list[int]:
    """The example order of one epoch: a permutation that depends only on (seed, epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_examples, generator=generator).tolist()


@REGIMES.register("off_policy")
class OffPolicy(Regime):
    """Batches of dataset examples in a seeded order that reshuffles every epoch.

    Micro-batch `k = step * grad_accum + m` takes the next `batch_size * world_size` examples of
    the global order; process `rank` takes its slice. Any step's batch can be rebuilt from the
    step number alone, which is what makes resuming exact. Generating regimes build on this: they
    take the same examples' prompts and replace the completions.
    """

    trains_on_dataset = True  # subclasses that replace sequences set it back to False

    def __init__(self, context: RegimeContext) -> None:
        super().__init__(context)
        self._orders: dict[int, list[int]] = {}

    def _indices(self, slot: int) -> list[int]:
        c = self.context
        n = len(self.train_set)
        per_slot = c.batch_size * c.world_size
        start = slot * per_slot + c.rank * c.batch_size
        out = []
        for pos in range(start, start + c.batch_size):
            epoch, offset = divmod(pos, n)
            out.append(self._order(epoch)[offset])
        return out

    def _order(self, epoch: int) -> list[int]:
        # a micro-batch spans at most two epochs: keep the two most recent orders
        if epoch not in self._orders:
            if len(self._orders) >= 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = global_order(len(self.train_set), self.context.seed, epoch)
        return self._orders[epoch]

    @property
    def train_set(self) -> list[Encoded] | tuple[Encoded, ...]:
        """The examples batches are drawn from (a regime may replace the dataset's)."""
        return self.context.dataset  # type: ignore[return-value]

    def examples(self, step: int, micro: int) -> list[Encoded]:
        """The dataset examples of micro-batch `micro` of step `step` on this process."""
        slot = step * self.context.grad_accum + micro
        return [self.train_set[i] for i in self._indices(slot)]

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        return [self.collate(self.examples(step, m)) for m in range(self.context.grad_accum)]
