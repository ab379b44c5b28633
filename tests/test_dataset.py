"""Reading the store: validation errors, loaders, episode splits and torch batches."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamenv.data.collect import collect, shard_dir_for
from dreamenv.data.dataset import (
    FrameDataset,
    iterate_frame_batches,
    open_rollouts,
    sequence_batches,
    split_episode_ids,
)
from tests.tiny_envs import MODULE, PIXELS_ID

UNREADABLE = "is not a readable HDF5 rollout file"


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 10-episode store in 3 shards."""
    out = tmp_path_factory.mktemp("store") / "rollouts.h5"
    return collect(f"{MODULE}:{PIXELS_ID}", out, 10, episodes_per_shard=4, backend="serial", progress=False)


@pytest.fixture
def store_copy(store: Path, tmp_path: Path) -> Path:
    """A private copy of the store to break."""
    shutil.copytree(store.parent, tmp_path / "copy")
    return tmp_path / "copy" / store.name


def test_corrupt_file(tmp_path: Path) -> None:
    bad = tmp_path / "garbage.h5"
    bad.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match=f"{UNREADABLE}.*dreamenv collect"):
        open_rollouts(bad)


def test_truncated_shard(store_copy: Path) -> None:
    shard = shard_dir_for(store_copy) / "shard-00001.h5"
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"shard-00001.h5 {UNREADABLE}"):
        open_rollouts(store_copy)
    with pytest.raises(ValueError, match=UNREADABLE):
        open_rollouts(shard)


def test_missing_shard_named(store_copy: Path) -> None:
    (shard_dir_for(store_copy) / "shard-00002.h5").unlink()
    with pytest.raises(ValueError, match="shard-00002.h5 is missing"):
        open_rollouts(store_copy)


def test_missing_file() -> None:
    with pytest.raises(FileNotFoundError, match="dreamenv collect"):
        open_rollouts("/nonexistent/rollouts.h5")


def test_single_shard_file_opens(store: Path) -> None:
    with open_rollouts(store) as index, open_rollouts(shard_dir_for(store) / "shard-00000.h5") as shard:
        assert shard.num_episodes == 4 and shard.env_id == index.env_id
        n = shard.num_steps
        np.testing.assert_array_equal(shard.load_frames(), index.load_frames(np.arange(n)))


def test_bounds_and_indexed_frames(store: Path) -> None:
    with open_rollouts(store) as r:
        bounds = r.episode_bounds()
        starts = r.load_arrays()["episode_starts"]
        frames = r.load_frames()
        picked = r.load_frames([7, 2, 3, 7, r.num_steps - 1])
        assert r.load_frames([]).shape == (0, 64, 64, 3)
        with pytest.raises(IndexError):
            r.load_frames([r.num_steps])
    assert bounds.shape == (10, 2) and (bounds[1:, 0] == bounds[:-1, 1]).all()
    np.testing.assert_array_equal(np.flatnonzero(starts), bounds[:, 0])
    np.testing.assert_array_equal(picked, frames[[7, 2, 3, 7, len(frames) - 1]])


def test_split_episodes(store: Path) -> None:
    with open_rollouts(store) as r:
        train, held = r.split_episodes(0.2, seed=3)
        assert [a.tolist() for a in r.split_episodes(0.2, seed=3)] == [train.tolist(), held.tolist()]
    assert len(held) == 2 and not set(train) & set(held) and sorted([*train, *held]) == list(range(10))
    assert [len(a) for a in split_episode_ids(2, 0.1)] == [1, 1]
    assert [len(a) for a in split_episode_ids(1, 0.1)] == [1, 0]


def test_frame_batches(store: Path) -> None:
    with open_rollouts(store) as r:
        frames = r.load_frames()
    item = FrameDataset(frames)[3]
    assert item.shape == (3, 64, 64) and item.dtype == torch.float32
    torch.testing.assert_close(item, torch.from_numpy(frames[3]).permute(2, 0, 1).float() / 255)
    batches = list(iterate_frame_batches(frames, 32, np.random.default_rng(0)))
    assert all(b.shape[1:] == (3, 64, 64) and b.dtype == torch.float32 for b in batches)
    assert sum(len(b) for b in batches) == len(frames) and max(float(b.max()) for b in batches) <= 1.0
    assert torch.cat(batches).sum().item() == pytest.approx(frames.astype(np.float64).sum() / 255, rel=1e-4)
    assert all(len(b) == 32 for b in iterate_frame_batches(frames, 32, np.random.default_rng(0), drop_last=True))


def test_sequence_batches_masks() -> None:
    lengths = [3, 7, 5]
    latents = [np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * e for e, n in enumerate(lengths)]
    actions = [np.full(n, e, dtype=np.int64) for e, n in enumerate(lengths)]
    rewards = [np.ones(n, np.float32) for n in lengths]
    dones = [np.eye(1, n, n - 1, dtype=np.float32)[0] for n in lengths]
    batches = list(sequence_batches(latents, actions, rewards, dones, 4, 2, np.random.default_rng(0)))
    assert len(batches) == 3  # windows: 1 + 2 + 2 = 5, batches of 2
    mask = torch.cat([b["mask"] for b in batches])
    next_mask = torch.cat([b["next_mask"] for b in batches])
    assert mask.shape == (5, 4) and int(mask.sum()) == sum(lengths)
    assert int(next_mask.sum()) == sum(lengths) - len(lengths) and not (next_mask & ~mask).any()
    for b in batches:
        assert b["actions"].dtype == torch.int64 and b["latents"].dtype == torch.float32
        assert float(b["dones"].sum()) == float((b["dones"] * b["mask"]).sum())
        assert float(b["rewards"].sum()) == float(b["mask"].sum())
        real = b["next_mask"]
        # z_{t+1} follows z_t in the arange latents: next - current = one step (2 per row)
        torch.testing.assert_close((b["next_latents"] - b["latents"])[real], torch.full_like(b["latents"][real], 2.0))
        assert float(b["latents"][~b["mask"]].abs().sum()) == 0
    assert float(torch.cat([b["dones"] for b in batches]).sum()) == len(lengths)
