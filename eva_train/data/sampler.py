"""Deterministic, resumable, rank-sharded sampling over an epoch of `epoch_length` samples.

Epoch e's order is a keyed bijection of [0, epoch_length) (a Feistel network with cycle-walking,
keys from (seed, epoch)), evaluated in numpy chunks: no list of indices exists anywhere, and any
global position can be looked up directly, which makes resuming O(1).

Positions are global: in an epoch that this run enters at position p0, rank r takes
p0 + r, p0 + r + W, ... for floor((L - p0) / W) samples; the tail (< W samples) is dropped, so
every rank sees exactly as many samples as every other. The state is (epoch, position), so a
run can continue on any world size or worker count.

`skip` drops a range of the stream (the batches of a loss spike the run rolled back over): the
next iterator starts past it, and every later state counts it (`skipped_samples`, cumulative), so
a resume from a later checkpoint continues exactly where the skipping run would have.
"""

from collections.abc import Iterator

import numpy as np
import torch

FEISTEL_ROUNDS = 4
CHUNK_POSITIONS = 4096
_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer: a well-mixed 64-bit hash, vectorized (uint64 wraps on overflow)."""
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


class FeistelPermutation:
    """A bijection of [0, n) keyed by (seed, epoch)."""

    def __init__(self, n: int, seed: int, epoch: int):
        self.n = int(n)
        bits = max(2, int(self.n - 1).bit_length())
        self.half_bits = (bits + 1) // 2
        self.half_mask = np.uint64((1 << self.half_bits) - 1)
        words = np.random.SeedSequence([seed & 0xFFFFFFFF, seed >> 32, epoch, 0xFE15]).generate_state(
            FEISTEL_ROUNDS, dtype=np.uint64
        )
        self.keys = [np.uint64(k) for k in words]

    def _encrypt(self, x: np.ndarray) -> np.ndarray:
        shift = np.uint64(self.half_bits)
        left, right = x >> shift, x & self.half_mask
        for key in self.keys:
            left, right = right, left ^ (_mix64(right ^ key) & self.half_mask)
        return (left << shift) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = np.asarray(positions, dtype=np.uint64)
        with np.errstate(over="ignore"):
            y = self._encrypt(x)
            outside = y >= np.uint64(self.n)
            while outside.any():  # cycle-walk: the domain is < 4n, so this ends fast
                y[outside] = self._encrypt(y[outside])
                outside = y >= np.uint64(self.n)
        return y.astype(np.int64)


def rank_positions(start: int, epoch_length: int, rank: int, world_size: int) -> range:
    """Global positions rank takes in an epoch entered at `start` (equal counts on every rank)."""
    per_rank = max(0, epoch_length - start) // world_size
    return range(start + rank, start + per_rank * world_size, world_size)


class ResumableSampler(torch.utils.data.Sampler):
    """Yields `(epoch, sample_id)`; infinite unless `num_epochs` is given (then it has a length)."""

    def __init__(
        self,
        epoch_length: int,
        *,
        rank: int,
        world_size: int,
        seed: int,
        shuffle: bool = True,
        num_epochs: int | None = None,
        state: dict | None = None,
    ):
        if epoch_length < world_size:
            raise ValueError(
                f"an epoch of {epoch_length} samples cannot feed {world_size} ranks; index more data or use fewer ranks"
            )
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        self.epoch_length, self.rank, self.world_size = int(epoch_length), rank, world_size
        self.seed, self.shuffle, self.num_epochs = seed, shuffle, num_epochs
        state = state or {"epoch": 0, "position": 0}
        if state.get("epoch_length", self.epoch_length) != self.epoch_length:
            raise ValueError(
                f"sampler state is for an epoch of {state['epoch_length']} samples but the index now "
                f"gives {self.epoch_length}; resume with the same --data.index"
            )
        self.start_epoch, self.start_position = int(state["epoch"]), int(state["position"])
        self.skipped_before = int(state.get("skipped_samples", 0))  # by the runs this one resumes
        self.skipped = 0  # by this run, all ranks
        self.iter_start: tuple[int, int] | None = None  # set by skip: where iterators begin

    def state_dict(self, epoch: int, position: int) -> dict:
        return {
            "epoch": epoch,
            "position": position,
            "epoch_length": self.epoch_length,
            "seed": self.seed,
            "skipped_samples": self.skipped_before + self.skipped,
        }

    def skip(self, count: int, global_samples_consumed: int) -> dict:
        """Drop the `count` samples (all ranks) that follow this run's first `global_samples_consumed`;
        iterators made afterwards start past them. Returns the state there."""
        if count < 0:
            raise ValueError(f"cannot skip {count} samples")
        self.skipped += int(count)
        state = self.state_after(global_samples_consumed)
        self.iter_start = (state["epoch"], state["position"])
        return state

    def state_after(self, global_samples_consumed: int) -> dict:
        """State after this run consumed that many samples over all ranks (from where it started),
        past any it skipped."""
        epoch, position = self.start_epoch, self.start_position
        left = int(global_samples_consumed) + self.skipped
        while True:
            usable = (max(0, self.epoch_length - position) // self.world_size) * self.world_size
            if left < usable:
                return self.state_dict(epoch, position + left)
            left -= usable
            epoch, position = epoch + 1, 0

    def order(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        if not self.shuffle:
            return np.asarray(positions, dtype=np.int64)
        return FeistelPermutation(self.epoch_length, self.seed, epoch)(positions)

    def _epoch_keys(self, epoch: int, start: int) -> Iterator[tuple[int, int]]:
        positions = rank_positions(start, self.epoch_length, self.rank, self.world_size)
        for i in range(0, len(positions), CHUNK_POSITIONS):
            chunk = np.arange(
                positions[i],
                positions[min(i + CHUNK_POSITIONS, len(positions)) - 1] + 1,
                self.world_size,
                dtype=np.int64,
            )
            for sample_id in self.order(epoch, chunk).tolist():
                yield epoch, sample_id

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, start = self.iter_start or (self.start_epoch, self.start_position)
        while self.num_epochs is None or epoch < self.start_epoch + self.num_epochs:
            yield from self._epoch_keys(epoch, start)
            epoch, start = epoch + 1, 0

    def __len__(self) -> int:
        if self.num_epochs is None:
            raise TypeError("the training sampler is infinite; count steps instead of calling len()")
        first = len(rank_positions(self.start_position, self.epoch_length, self.rank, self.world_size))
        return first + (self.num_epochs - 1) * (self.epoch_length // self.world_size)
