"""Sampler properties: coverage, equal counts, determinism, exact resume (also on another world size)."""

import itertools

import numpy as np
import pytest

from eva_train.data.sampler import FeistelPermutation, ResumableSampler


def take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def global_stream(length, world, seed, steps_per_rank, state=None):
    """Interleave ranks' keys by global position (rank r at position p*world + r)."""
    per_rank = [
        take(ResumableSampler(length, rank=r, world_size=world, seed=seed, state=state), steps_per_rank)
        for r in range(world)
    ]
    return [per_rank[r][i] for i in range(steps_per_rank) for r in range(world)]


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4099])
def test_feistel_is_a_permutation(n):
    out = FeistelPermutation(n, seed=3, epoch=1)(np.arange(n))
    assert np.array_equal(np.sort(out), np.arange(n))


def test_each_sample_once_per_epoch_across_ranks_with_equal_counts():
    length, world = 103, 4
    per_rank = [ResumableSampler(length, rank=r, world_size=world, seed=0, num_epochs=1) for r in range(world)]
    keys = [list(s) for s in per_rank]
    assert {len(k) for k in keys} == {length // world} and all(len(s) == length // world for s in per_rank)
    ids = [sid for k in keys for _, sid in k]
    assert len(set(ids)) == len(ids) == (length // world) * world  # no duplicates, tail of 3 dropped
    assert all(epoch == 0 for k in keys for epoch, _ in k)


def test_epochs_are_full_permutations_and_differ():
    sampler = ResumableSampler(50, rank=0, world_size=1, seed=7)
    keys = take(sampler, 150)
    epochs = [[sid for e, sid in keys if e == k] for k in range(3)]
    assert all(sorted(e) == list(range(50)) for e in epochs)
    assert epochs[0] != epochs[1] != epochs[2]


def test_same_seed_same_order_other_seed_other_order():
    a = take(ResumableSampler(1000, rank=1, world_size=2, seed=5), 300)
    assert a == take(ResumableSampler(1000, rank=1, world_size=2, seed=5), 300)
    assert a != take(ResumableSampler(1000, rank=1, world_size=2, seed=6), 300)


def test_unshuffled_val_order():
    sampler = ResumableSampler(10, rank=1, world_size=3, seed=0, shuffle=False, num_epochs=1)
    assert [sid for _, sid in sampler] == [1, 4, 7] and len(sampler) == 3


@pytest.mark.parametrize("new_world", [3, 2, 5])
def test_exact_continuation_after_mid_epoch_stop(new_world):
    length, seed, old_world, batch = 97, 11, 3, 4
    full = global_stream(length, 1, seed, 400)  # the order one rank would see: the reference stream
    steps = 10  # consumed 10 steps * 3 ranks * 4 = 120 samples: one epoch (96 usable) + 24
    first_run = global_stream(length, old_world, seed, steps * batch)
    state = ResumableSampler(length, rank=0, world_size=old_world, seed=seed).state_after(steps * old_world * batch)
    assert (state["epoch"], state["position"]) == (1, 120 - 96)
    resumed = global_stream(length, new_world, seed, 20, state=state)
    # epoch 0 under world 3 dropped 1 sample; from epoch 1 on the streams use the same positions
    epoch1_ref = [k for k in full if k[0] == 1]
    assert first_run[96:] == epoch1_ref[:24]
    usable = ((length - 24) // new_world) * new_world
    assert resumed[: min(usable, len(resumed))] == epoch1_ref[24 : 24 + min(usable, len(resumed))]


def test_state_after_across_epochs_then_resume_continues_the_same_stream():
    length, world = 20, 2
    sampler = ResumableSampler(length, rank=0, world_size=world, seed=1)
    state = sampler.state_after(46)  # 2 full epochs (40) + 6
    assert (state["epoch"], state["position"]) == (2, 6)
    chained = ResumableSampler(length, rank=0, world_size=world, seed=1, state=state).state_after(14)
    assert (chained["epoch"], chained["position"]) == (3, 0)
    whole = global_stream(length, world, 1, 40)
    resumed = global_stream(length, world, 1, 10, state=state)
    assert resumed == whole[46:66]


def test_state_for_another_index_is_rejected():
    state = ResumableSampler(100, rank=0, world_size=1, seed=0).state_after(10)
    with pytest.raises(ValueError, match="same --data.index"):
        ResumableSampler(90, rank=0, world_size=1, seed=0, state=state)


def test_too_small_epoch_for_world_is_rejected():
    with pytest.raises(ValueError, match="cannot feed 4 ranks"):
        ResumableSampler(3, rank=0, world_size=4, seed=0)
