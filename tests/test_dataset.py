"""Reading the store: validation errors, loaders, episode splits and torch batches."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamenv.data.collect import collect, shard_dir_for
from dreamenv.data.dataset import (
    EpisodeData,
    hit_flags,
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
        train, held = split_episode_ids(r.num_episodes, 0.2, seed=3)
        assert [a.tolist() for a in split_episode_ids(r.num_episodes, 0.2, seed=3)] == [train.tolist(), held.tolist()]
    assert len(held) == 2 and not set(train) & set(held) and sorted([*train, *held]) == list(range(10))
    assert [len(a) for a in split_episode_ids(2, 0.1)] == [1, 1]
    assert [len(a) for a in split_episode_ids(1, 0.1)] == [1, 0]


def test_frame_batches(store: Path) -> None:
    with open_rollouts(store) as r:
        frames = r.load_frames()
    numbered = list(iterate_frame_batches(frames, 32, seed=0))
    batches = [b for _, b in numbered]
    assert [n for n, _ in numbered] == list(range(len(batches)))
    assert all(b.shape[1:] == (3, 64, 64) and b.dtype == torch.float32 for b in batches)
    assert sum(len(b) for b in batches) == len(frames) and max(float(b.max()) for b in batches) <= 1.0
    assert torch.cat(batches).sum().item() == pytest.approx(frames.astype(np.float64).sum() / 255, rel=1e-4)
    resumed = list(iterate_frame_batches(frames, 32, seed=0, start=2))  # a resumed epoch skips what it did
    assert [n for n, _ in resumed] == list(range(2, len(batches)))
    torch.testing.assert_close(resumed[0][1], batches[2])
    rows = np.arange(3, len(frames), 2)  # a subset of rows gives the batches of those rows copied out
    for (_, got), (_, expected) in zip(iterate_frame_batches(frames, 32, 5, index=rows),
                                       iterate_frame_batches(frames[rows], 32, 5), strict=True):
        torch.testing.assert_close(got, expected)


def test_sequence_batches_masks() -> None:
    lengths = [3, 7, 5]
    episodes = [
        EpisodeData(
            mu=np.arange(n * 2, dtype=np.float32).reshape(n, 2) + 100 * e,
            logvar=np.zeros((n, 2), np.float32),
            actions=np.full((n, 1), e, dtype=np.float32),
            rewards=np.ones(n, np.float32),
            terminated=np.eye(1, n, n - 1, dtype=np.float32)[0],
        )
        for e, n in enumerate(lengths)
    ]
    batches = list(sequence_batches(episodes, 4, 2, np.random.default_rng(0)))
    assert len(batches) == 3  # pieces: 1 + 2 + 2 = 5, batches of 2
    steps = sum(int(b["step_mask"].sum()) for b in batches)
    nexts = sum(int(b["next_mask"].sum()) for b in batches)
    assert steps == sum(lengths) and nexts == sum(lengths) - len(lengths)
    for b in batches:
        assert not (b["next_mask"].bool() & ~b["step_mask"].bool()).any()
        assert float(b["rewards"].sum()) == float(b["step_mask"].sum())
        real = b["next_mask"].bool()
        # z_{t+1} follows z_t in the arange latents: next - current = one step (2 per row)
        torch.testing.assert_close((b["mu"][:, 1:] - b["mu"][:, :-1])[real], torch.full_like(b["mu"][:, 1:][real], 2.0))
        assert float(b["mu"][:, :-1][~b["step_mask"].bool()].abs().sum()) == 0
        assert b["mu"].shape[1] == b["step_mask"].shape[1] + 1
    assert sum(float(b["dones"].sum()) for b in batches) == len(lengths)
    assert all("hits" not in b for b in batches)  # no hit flags, no hits array


def test_hit_flags_mark_falls_and_the_death() -> None:
    """Step t is a hit when a game variable seen after it is lower than before it, or when it ended in a death."""
    health = np.array([[3, 9], [3, 9], [2, 9], [2, 9], [2, 8], [1, 8]], np.float32)  # a second variable falls at 3
    np.testing.assert_array_equal(hit_flags(health, np.eye(1, 6, 5)[0]), [0, 1, 0, 1, 1, 1])
    np.testing.assert_array_equal(hit_flags(health[:5], np.zeros(5)), [0, 1, 0, 1, 0])  # cut off: no death
    np.testing.assert_array_equal(hit_flags(np.array([5.0, 6.0, 6.0]), np.zeros(3)), [0, 0, 0])  # a rise is no hit
    episodes = [EpisodeData(mu=np.zeros((n, 2), np.float32), logvar=np.zeros((n, 2), np.float32),
                            actions=np.zeros((n, 1), np.float32), rewards=np.ones(n, np.float32),
                            terminated=np.eye(1, n, n - 1, dtype=np.float32)[0], hits=np.arange(n) % 2 == 1)
                for n in (3, 6)]
    batches = list(sequence_batches(episodes, 4, 2, np.random.default_rng(0)))
    assert sum(float(b["hits"].sum()) for b in batches) == 1 + 3
    assert all(float((b["hits"] * (1 - b["step_mask"])).sum()) == 0 for b in batches)  # none in the padding


def test_no_rows_from_a_store_of_many_shards(tmp_path: Path) -> None:
    """HDF5 cannot select nothing from a virtual dataset of many sources; asking for no frames gives an empty array."""
    out = collect(f"{MODULE}:{PIXELS_ID}", tmp_path / "many.h5", 70, episodes_per_shard=1, backend="serial", progress=False)
    with open_rollouts(out) as r:
        assert r.load_frames(np.zeros(0, np.int64)).shape == (0, 64, 64, 3)
        assert r.load_frames([2, 0]).shape == (2, 64, 64, 3)
