"""The one entry point the engine calls: index -> sampler -> workers (decode, crop, mask) -> batches."""

import atexit
import signal
import weakref
from collections.abc import Sequence

import torch

from eva_train.data.dataset import MaskedImageDataset, SampleSpec
from eva_train.data.index import open_index
from eva_train.data.masking import build_mask_generator
from eva_train.data.sampler import ResumableSampler

# The signals a job gets to stop (SLURM, launchers, a user's kill of the process group). The rank
# saves on them and then shuts its workers down; a worker that died of one first would fail the
# rank's next batch ("DataLoader worker ... killed by signal: Terminated") before it could save.
JOB_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP)


def ignore_job_signals(worker_id: int) -> None:
    """worker_init_fn: the worker ignores the job's signals (it still ends with its rank: the
    DataLoader shuts it down, or it notices its parent is gone)."""
    for signum in JOB_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    # The parent blocked them around the fork (SignalSafeLoader): one sent in between stayed
    # pending and is discarded now instead of killing the worker.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, JOB_SIGNALS)


_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _shut_down_leftover_workers() -> None:
    # At interpreter exit multiprocessing terminates daemonic children with SIGTERM and joins them:
    # ours ignore it, so workers of an iterator still alive then (a module global, a traceback's
    # frame) would hang the exit. Registered after torch's and multiprocessing's exit hooks, so it
    # runs first, while the iterator's own orderly shutdown still works.
    for iterator in list(_LIVE_ITERATORS):
        try:
            iterator._shutdown_workers()
        except Exception:  # noqa: BLE001 - best effort at exit; the kill below still frees the join
            pass
        for process in getattr(iterator, "_workers", ()):
            if process.is_alive():
                process.kill()


class SignalSafeLoader(torch.utils.data.DataLoader):
    """Blocks the job's signals in the forking thread while workers start, so no worker exists
    with the default (fatal) disposition; the rank's own handlers run once it unblocks.
    (`_get_iterator` is where every DataLoader version forks its workers.)"""

    _exit_hook_registered = False

    def _get_iterator(self):
        if self.num_workers == 0:
            return super()._get_iterator()
        old = signal.pthread_sigmask(signal.SIG_BLOCK, JOB_SIGNALS)
        try:
            iterator = super()._get_iterator()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)
        _LIVE_ITERATORS.add(iterator)
        if not SignalSafeLoader._exit_hook_registered:
            atexit.register(_shut_down_leftover_workers)
            SignalSafeLoader._exit_hook_registered = True
        return iterator


def build_loader(
    data_cfg,
    mask_cfg,
    *,
    index_paths: Sequence[str],
    img_size: int,
    patch_size: int,
    micro_batch_size: int,
    rank: int,
    world_size: int,
    seed: int,
    train: bool = True,
    sampler_state: dict | None = None,
):
    """Returns (DataLoader, ResumableSampler). Train: infinite, shuffled, resumable. Val: one pass
    in index order, equal counts per rank (tail dropped).

    Batches: images uint8 (B,3,H,W), mask bool (B,N), label/index/bad int64 (B,)."""
    reader = open_index(index_paths)
    grid = (img_size // patch_size, img_size // patch_size)
    spec = SampleSpec(
        img_size=img_size,
        min_crop_scale=data_cfg.min_crop_scale,
        max_image_pixels=data_cfg.max_image_pixels,
        train=train,
        seed=seed,
    )
    dataset = MaskedImageDataset(reader, spec, build_mask_generator(mask_cfg, grid))
    sampler = ResumableSampler(
        reader.epoch_length,
        rank=rank,
        world_size=world_size,
        seed=seed,
        shuffle=train,
        num_epochs=None if train else 1,
        state=sampler_state if train else None,
    )
    workers = data_cfg.num_workers
    loader = SignalSafeLoader(
        dataset,
        batch_size=micro_batch_size,
        sampler=sampler,
        num_workers=workers,
        drop_last=train,
        worker_init_fn=ignore_job_signals,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=train and workers > 0,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None,
    )
    return loader, sampler
