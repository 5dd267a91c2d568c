"""Training batches indexed by update step, with augmentation randomness derived from the position.

Every item of global batch t is fetched as `(index, item_seed[, scale])`, and the dataset is
reseeded with item_seed before it augments the image. So the images of step t depend only on
(seed, t): not on DataLoader workers, not on where a run was resumed, not on the number of
DDP ranks (rank r takes slice r of the same global batch).
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from voc12.data import SCALE_RANGE

# The two orders of the released scripts.
ORDERS = ("epochs", "stream")


# What a derived seed is for, so that streams of different purposes never coincide.
ITEM, PERMUTATION, BATCH_SCALE = 0, 1, 2


def position_seed(seed: int, purpose: int, *position: int) -> int:
    """A well-mixed 63-bit seed from (seed, purpose, position...), e.g. (seed, ITEM, step, slot)."""
    words = np.random.SeedSequence([seed, purpose, *position]).generate_state(2, np.uint64)
    return int(words[0] >> np.uint64(1))


class StepBatchSampler(Sampler[list[tuple]]):
    """This rank's part of the global batches of steps start_step, start_step + 1, ..., stop_step - 1.

    order "epochs" (train_from_init): a fresh permutation per epoch (drop_last), epoch e from
    torch.Generator seeded (seed, e). order "stream" (train_from_cls_weight): the list shuffled and
    repeated endlessly, batches running across repetitions, one scale ~ U(0.7, 1.3) per batch.
    """

    def __init__(self, num_items: int, global_batch: int, *, order: str, seed: int, start_step: int,
                 stop_step: int, rank: int = 0, world_size: int = 1, per_batch_scale: bool = False) -> None:
        if order not in ORDERS:
            raise ValueError(f"unknown batch order {order!r}; valid: {', '.join(ORDERS)}")
        if global_batch % world_size:
            raise ValueError(f"--batch_size {global_batch} (the global batch) must be divisible by the "
                             f"number of processes {world_size}")
        if order == "epochs" and num_items < global_batch:
            raise ValueError(f"the image list has {num_items} ids, fewer than one batch of {global_batch}")
        self.num_items = num_items
        self.global_batch = global_batch
        self.local_batch = global_batch // world_size
        self.order = order
        self.seed = seed
        self.start_step = start_step
        self.stop_step = stop_step
        self.rank = rank
        self.per_batch_scale = per_batch_scale

    @property
    def steps_per_epoch(self) -> int:
        return self.num_items // self.global_batch

    def _permutation(self, round_index: int) -> list[int]:
        generator = torch.Generator().manual_seed(position_seed(self.seed, PERMUTATION, round_index))
        return torch.randperm(self.num_items, generator=generator).tolist()

    def global_indices(self, step: int) -> list[int]:
        """Dataset indices of the whole global batch of `step`."""
        if self.order == "epochs":
            epoch, offset = divmod(step, self.steps_per_epoch)
            start = offset * self.global_batch
            return self._permutation(epoch)[start:start + self.global_batch]
        indices: list[int] = []
        position = step * self.global_batch
        while len(indices) < self.global_batch:
            round_index, offset = divmod(position, self.num_items)
            take = min(self.global_batch - len(indices), self.num_items - offset)
            indices.extend(self._permutation(round_index)[offset:offset + take])
            position += take
        return indices

    def batch_scale(self, step: int) -> float:
        rng = np.random.default_rng(position_seed(self.seed, BATCH_SCALE, step))
        return float(rng.uniform(*SCALE_RANGE))

    def __iter__(self) -> Iterator[list[tuple]]:
        first = self.rank * self.local_batch
        for step in range(self.start_step, self.stop_step):
            indices = self.global_indices(step)
            scale = self.batch_scale(step) if self.per_batch_scale else None
            batch = []
            for slot in range(first, first + self.local_batch):
                item = (indices[slot], position_seed(self.seed, ITEM, step, slot))
                batch.append(item + (scale,) if scale is not None else item)
            yield batch

    def __len__(self) -> int:
        return max(0, self.stop_step - self.start_step)


class PositionSeededDataset(Dataset):
    """Reseeds the wrapped dataset (its `reseed`) from the item's position seed before fetching it."""

    def __init__(self, dataset: Dataset) -> None:
        if not hasattr(dataset, "reseed"):
            raise TypeError(f"{type(dataset).__name__} has no reseed(seed); cannot make its augmentation "
                            "a function of the batch position")
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple) -> dict:
        index, item_seed = item[0], item[1]
        self.dataset.reseed(item_seed)
        return self.dataset[(index, item[2])] if len(item) == 3 else self.dataset[index]
