"""The one entry point the engine calls: index -> sampler -> workers (decode, crop, mask) -> batches."""
from typing import Optional, Sequence

import torch

from eva_train.data.dataset import MaskedImageDataset, SampleSpec
from eva_train.data.index import open_index
from eva_train.data.masking import build_mask_generator
from eva_train.data.sampler import ResumableSampler


def build_loader(data_cfg, mask_cfg, *, index_paths: Sequence[str], img_size: int, patch_size: int,
                 micro_batch_size: int, rank: int, world_size: int, seed: int, train: bool = True,
                 sampler_state: Optional[dict] = None):
    """Returns (DataLoader, ResumableSampler). Train: infinite, shuffled, resumable. Val: one pass
    in index order, equal counts per rank (tail dropped).

    Batches: images uint8 (B,3,H,W), mask bool (B,N), label/index/bad int64 (B,)."""
    reader = open_index(index_paths)
    grid = (img_size // patch_size, img_size // patch_size)
    spec = SampleSpec(img_size=img_size, min_crop_scale=data_cfg.min_crop_scale,
                      max_image_pixels=data_cfg.max_image_pixels, train=train, seed=seed)
    dataset = MaskedImageDataset(reader, spec, build_mask_generator(mask_cfg, grid))
    sampler = ResumableSampler(reader.epoch_length, rank=rank, world_size=world_size, seed=seed, shuffle=train,
                               num_epochs=None if train else 1, state=sampler_state if train else None)
    workers = data_cfg.num_workers
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=micro_batch_size, sampler=sampler, num_workers=workers, drop_last=train,
        pin_memory=torch.cuda.is_available(), persistent_workers=train and workers > 0,
        prefetch_factor=data_cfg.prefetch_factor if workers > 0 else None)
    return loader, sampler
