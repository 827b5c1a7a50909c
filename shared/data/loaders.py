"""Batches in a fixed order and the loaders that yield them.

Micro-batch k is a pure function of (seed, k) (`StepOrder`), so resume needs only the step, with any
number of loader workers. A small split is decoded once into memory (`CachedImages`, the
--cache-images rule); a larger one is decoded in DataLoader worker processes."""
from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch

from shared.data.datasets import Batch, Example, Examples, ImageDataset, ImageProblem, collate_examples
from shared.data.images import augment, augmentation_draws
from shared.errors import UserError, first_line


# A split whose decoded uint8 pixels fit in this many bytes is decoded once into memory (--cache-images auto).
CACHE_LIMIT_BYTES = 256 * 2 ** 20


def _collate_or_problem(items: list[Example | ImageProblem]) -> Batch | ImageProblem:
    problem = next((item for item in items if isinstance(item, ImageProblem)), None)
    return problem if problem is not None else collate_examples(items)


def make_loader(dataset: torch.utils.data.Dataset, batch_sampler: Any, num_workers: int, pin: bool,
                persistent: bool) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(
        dataset, batch_sampler=batch_sampler, num_workers=num_workers, collate_fn=_collate_or_problem,
        pin_memory=pin, persistent_workers=persistent and num_workers > 0,
        prefetch_factor=4 if num_workers > 0 else None, generator=_private_generator())


def _private_generator() -> torch.Generator:
    """A DataLoader draws its workers' base seed from this instead of torch's global generator, whose
    state a checkpoint restores: a loader started after --resume must not shift the training RNG stream.
    (Nothing here uses the workers' seeds: augmentation draws come from (seed, step, example).)"""
    return torch.Generator().manual_seed(0)


def raise_problem(item: Batch | ImageProblem) -> Batch:
    if isinstance(item, ImageProblem):
        raise UserError(f"{item}; remove or replace that file (or drop --strict-images to skip such images)")
    return item


class StepOrder:
    """An endless stream of seeded epoch permutations, cut into global batches.

    The examples of micro-batch k (k = step * accumulation + micro) are stream positions
    [k * global_batch, (k + 1) * global_batch); process `rank` takes every `world`-th of them.
    """

    def __init__(self, num_examples: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> None:
        self.num_examples = num_examples
        self.batch_size = batch_size  # per process
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self._epoch = -1
        self._permutation = torch.empty(0, dtype=torch.long)

    def _permutation_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._permutation = torch.randperm(self.num_examples, generator=generator)
            self._epoch = epoch
        return self._permutation

    def indices(self, micro_batch: int) -> torch.Tensor:
        """This process's example indices (batch_size,) for micro-batch `micro_batch`."""
        global_batch = self.batch_size * self.world_size
        start = micro_batch * global_batch
        positions = torch.arange(start + self.rank, start + global_batch, self.world_size)  # (batch_size,)
        out = torch.empty(len(positions), dtype=torch.long)
        for epoch in torch.unique(positions // self.num_examples).tolist():
            in_epoch = positions // self.num_examples == epoch
            out[in_epoch] = self._permutation_of(epoch)[positions[in_epoch] % self.num_examples]
        return out


class StepBatchSampler(torch.utils.data.Sampler):
    """Keys [(index, k), ...] of micro-batches k = first, first + 1, ... (endless): the batch sampler
    of the training loader, so batch composition stays a pure function of (seed, step)."""

    def __init__(self, order: StepOrder, first_micro_batch: int) -> None:
        self.order = order
        self.first = first_micro_batch

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        micro_batch = self.first
        while True:
            yield [(int(index), micro_batch) for index in self.order.indices(micro_batch)]
            micro_batch += 1


class CachedImages:
    """A split decoded once into memory as uint8 (lossless: preprocessing ends on 8-bit pixels),
    at the size training crops from. Batches equal those the streaming path gives."""

    def __init__(self, dataset: ImageDataset, num_workers: int, progress: bool = False) -> None:
        from tqdm.auto import tqdm

        self.dataset = dataset
        num, size = len(dataset), dataset.base_size
        try:
            self.pixels = torch.empty(num, dataset.channels, size, size, dtype=torch.uint8)
        except RuntimeError as error:
            raise UserError(f"the decoded split needs {num * dataset.channels * size * size / 2 ** 30:.1f} GiB "
                            f"({first_line(error)}); pass --cache-images never") from None
        self.problems: list[str] = []
        self.labels = torch.empty(num, dtype=torch.long)
        plain = ImageDataset(dataset.source, dataset.split, dataset.rows, size, dataset.channels,
                             strict=dataset.strict)
        bar = tqdm(total=num, desc=f"decoding {dataset.split}", disable=not progress, leave=False, unit="img")
        for batch in sequential_batches(plain, range(num), 256, num_workers):
            self.pixels[batch.indices] = batch.pixels
            self.labels[batch.indices] = batch.labels  # a replaced row: its substitute's pixels and label
            self.problems.extend(batch.problems)
            bar.update(len(batch.indices))
        bar.close()

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, keys: list[tuple[int, int]]) -> Batch:
        dataset, augmentation = self.dataset, self.dataset.augmentation
        pixels = [augment(self.pixels[index], augmentation_draws(
            augmentation.seed, micro_batch, index, dataset.base_size, dataset.image_size, augmentation.flip,
            augmentation.crop), dataset.image_size) for index, micro_batch in keys]
        indices = torch.tensor([index for index, _ in keys], dtype=torch.long)
        # the cache holds each replaced row's substitute; the problem was reported when it was decoded
        return Batch(torch.stack(pixels), self.labels[indices], indices, [])


def should_cache(dataset: ImageDataset, mode: str) -> bool:
    """The caching rule (--cache-images): always, never, or auto = when the decoded uint8 pixels fit
    in CACHE_LIMIT_BYTES (small datasets read for many epochs; decoding them once pays)."""
    if mode != "auto":
        return mode == "always"
    return len(dataset) * dataset.channels * dataset.base_size ** 2 <= CACHE_LIMIT_BYTES


def training_batches(data: ImageDataset | CachedImages, order: StepOrder, first_micro_batch: int,
                     num_workers: int, pin_memory: bool) -> Iterator[Batch]:
    """Micro-batches first_micro_batch, first_micro_batch + 1, ... for this process, endlessly."""
    sampler = StepBatchSampler(order, first_micro_batch)
    if isinstance(data, CachedImages):
        return (data.batch(keys) for keys in sampler)
    loader = make_loader(Examples(data), sampler, num_workers, pin_memory, persistent=True)
    return (raise_problem(item) for item in loader)


def code_batches(codes: Any, order: StepOrder, first_micro_batch: int, num_workers: int,
                 pin_memory: bool) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(codes, labels) of micro-batches first_micro_batch, ... from a memory-mapped CodesDataset, endlessly.
    A batch is one gather from the mapped file; workers (`num_workers` > 0) read ahead."""
    def index_lists() -> Iterator[list[int]]:
        micro_batch = first_micro_batch
        while True:
            yield order.indices(micro_batch).tolist()
            micro_batch += 1

    if num_workers == 0:
        return (codes.__getitems__(indices) for indices in index_lists())
    return iter(torch.utils.data.DataLoader(codes, batch_sampler=index_lists(), num_workers=num_workers,
                                            collate_fn=_already_batched, pin_memory=pin_memory,
                                            persistent_workers=True, prefetch_factor=4,
                                            generator=_private_generator()))


def _already_batched(batch: Any) -> Any:
    return batch


def sequential_batches(data: ImageDataset | CachedImages, rows: range, batch_size: int, num_workers: int,
                       pin_memory: bool = False) -> Iterator[Batch]:
    """Rows `rows` of `data` in order, in batches of `batch_size` (no augmentation)."""
    starts = range(rows.start, rows.stop, batch_size)
    keys = [[(index, 0) for index in range(start, min(start + batch_size, rows.stop))] for start in starts]
    if isinstance(data, CachedImages):
        yield from (data.batch(batch_keys) for batch_keys in keys)
        return
    if not keys:
        return
    loader = make_loader(Examples(data), keys, min(num_workers, len(keys)), pin_memory, persistent=False)
    for item in loader:
        yield raise_problem(item)
