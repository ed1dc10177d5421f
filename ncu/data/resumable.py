"""A shuffled training loader that a checkpoint taken inside an epoch can continue exactly.

``ResumableLoader`` shuffles as ``DataLoader(shuffle=True)`` does (the same order, drawn from torch's generator
the same way, so runs that never resume give the same numbers), and can report its ``position`` after some
batches: the epoch's shuffling seed and the torch random state just before the next batch was fetched (the
loop fetches one batch ahead, and the random crops of a batch draw from that state). Resuming from a position
yields the epoch's remaining batches in their order, with the random state as it was: the rest of the epoch is
the one the uninterrupted run had. This holds with ``num_workers=0``; with workers each worker's augmentation
is seeded afresh when the loader restarts, so only the order is the same.
"""
from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, Sampler


class ResumableRandomSampler(Sampler[int]):
    """``RandomSampler``'s permutation (its seed drawn from torch's generator at each pass), that can
    start a pass from a recorded seed after its first ``skip`` indices instead."""

    def __init__(self, data_source: Any) -> None:
        self.data_source = data_source
        self.seed: int | None = None
        self._resume: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.data_source)

    def resume(self, seed: int, skip: int) -> None:
        self._resume = (seed, skip)

    def __iter__(self) -> Iterator[int]:
        resume, self._resume = self._resume, None
        seed, skip = resume if resume else (int(torch.empty((), dtype=torch.int64).random_().item()), 0)
        self.seed = seed
        generator = torch.Generator()
        generator.manual_seed(seed)
        yield from torch.randperm(len(self.data_source), generator=generator).tolist()[skip:]


class ResumableLoader(DataLoader):
    """A shuffled, batched loader whose ``position(batches)`` a checkpoint keeps and ``resume`` continues."""

    def __init__(self, dataset: Any, batch_size: int, **kwargs: Any) -> None:
        super().__init__(dataset, batch_size=batch_size, sampler=ResumableRandomSampler(dataset), **kwargs)
        # The random state before fetching each of the last few batches, by batch number in the pass (the
        # loop fetches one ahead of the batch it trains).
        self._states: dict[int, torch.Tensor] = {}
        self._resume: dict[str, Any] | None = None

    def position(self, batches: int) -> dict[str, Any] | None:
        """Where the current pass stands after ``batches`` trained batches: its seed, the samples to skip and
        the random state before batch ``batches`` is fetched: recorded if the loop fetched it ahead, else now's
        (None when neither: not this pass)."""
        if self.sampler.seed is None:
            return None
        if batches in self._states:
            state = self._states[batches]
        elif batches - 1 in self._states:  # not fetched yet: what it will draw from is the state now
            state = torch.get_rng_state()
        else:
            return None
        return {"seed": self.sampler.seed, "skip": batches * self.batch_size, "rng": state}

    def resume(self, position: dict[str, Any]) -> None:
        """The next pass continues the recorded one (its remaining batches, its random state)."""
        self._resume = position

    def __iter__(self) -> Iterator[Any]:
        resume, self._resume = self._resume, None
        if resume is not None:  # (workers start drawing indices as the iterator is made)
            self.sampler.resume(int(resume["seed"]), int(resume["skip"]))
        inner = super().__iter__()  # draws the workers' base seed from torch's generator
        start = 0
        if resume is not None:  # the random state as the interrupted pass had it before its next batch
            start = int(resume["skip"]) // self.batch_size
            torch.set_rng_state(resume["rng"])
        self._states = {}
        for number in itertools.count(start):
            self._states[number] = torch.get_rng_state()
            self._states.pop(number - 3, None)
            try:
                batch = next(inner)
            except StopIteration:
                return
            yield batch
