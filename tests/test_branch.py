"""Branches near deaths: replayed pasts match the recording, the branches act otherwise, resume, clear errors."""
from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from dreamenv.data.branch import BranchConfig, collect_branches, dying_episodes
from dreamenv.data.collect import collect, shard_dir_for
from dreamenv.data.dataset import open_rollouts
from tests.tiny_envs import HEALTH_ID, MODULE, PIXELS_ID

PIXELS = f"{MODULE}:{PIXELS_ID}"
HEALTH = f"{MODULE}:{HEALTH_ID}"
CONFIG = BranchConfig(offsets=(2, 6), context=4, suffix=10, first_hold=(3, 3))


def _episodes(path: Path) -> list[dict[str, np.ndarray]]:
    with open_rollouts(path) as r:
        arrays, frames = r.load_arrays(), r.load_frames()
        bounds = r.episode_bounds()
    return [{**{k: v[lo:hi] for k, v in arrays.items()}, "frames": frames[lo:hi]} for lo, hi in bounds]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return collect(PIXELS, tmp_path / "src.h5", 12, episodes_per_shard=4, backend="serial", progress=False, seed=7)


def _branch(source: Path, out: Path, **kw) -> Path:
    kw = {"episodes_per_shard": 3, "backend": "serial", "env_id": PIXELS, "progress": False, **kw}
    return collect_branches([source], out, CONFIG, **kw)


def test_branches_share_the_recorded_past_and_then_act_otherwise(source: Path, tmp_path: Path) -> None:
    deaths, attrs = dying_episodes([source])
    recorded = _episodes(source)
    dying = [e for e in recorded if e["terminated"][-1]]
    assert attrs["env_id"] == PIXELS_ID and len(deaths) == len(dying) > 0
    assert [d.length for d in deaths] == [len(e["frames"]) for e in dying]
    branches = _episodes(_branch(source, tmp_path / "b.h5"))
    expected = [(e, point) for e in dying for point in CONFIG.branches(len(e["frames"]))]
    assert len(branches) == len(expected) > len(dying)
    changed = 0
    for b, (e, point) in zip(branches, expected):
        first = max(0, point - CONFIG.context)
        past = point - first
        np.testing.assert_array_equal(b["frames"][:past], e["frames"][first:point])
        np.testing.assert_array_equal(b["actions"][:past], e["actions"][first:point])
        # TinyPixels dies at a step drawn from its seed, whatever the actions: the branch dies where the recording did
        assert len(b["frames"]) == len(e["frames"]) - first and b["terminated"][-1] and b["terminated"].sum() == 1
        after = b["actions"][past:]
        assert (after[:3] == after[0]).all()  # the first other action is held first_hold = 3 steps
        changed += not np.array_equal(after, e["actions"][point:])
        assert b["episode_starts"][0] and b["episode_starts"].sum() == 1
    assert changed > len(branches) // 2
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f.attrs["policy"].startswith("branch:") and f.attrs["complete"]


def test_branches_keep_the_game_variables_of_their_past(tmp_path: Path) -> None:
    """Branches of an env with game variables store them, as recorded before each branch point."""
    source = collect(HEALTH, tmp_path / "src.h5", 12, episodes_per_shard=4, backend="serial", progress=False, seed=7)
    dying = [e for e in _episodes(source) if e["terminated"][-1]]
    branches = _episodes(_branch(source, tmp_path / "b.h5", env_id=HEALTH))
    expected = [(e, point) for e in dying for point in CONFIG.branches(len(e["frames"]))]
    assert len(branches) == len(expected) > 0
    for b, (e, point) in zip(branches, expected):
        first = max(0, point - CONFIG.context)
        assert b["game_variables"].shape == (len(b["frames"]), 1)
        np.testing.assert_array_equal(b["game_variables"][:point - first], e["game_variables"][first:point])
    with h5py.File(tmp_path / "b.h5", "r") as f:
        assert f.attrs["game_variables"] == 1


def test_resume_rewrites_only_the_missing_shard(source: Path, tmp_path: Path) -> None:
    out = _branch(source, tmp_path / "b.h5")
    before = _episodes(out)
    shards = sorted(shard_dir_for(out).glob("shard-*.h5"))
    assert len(shards) > 1
    shards[1].unlink()
    untouched = shards[0].stat().st_mtime_ns
    after = _episodes(_branch(source, out))
    assert shards[0].stat().st_mtime_ns == untouched
    assert len(after) == len(before)
    for a, b in zip(after, before):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    with pytest.raises(ValueError, match="holds rollouts with seed"):
        _branch(source, out, seed=1)


def test_a_store_that_does_not_replay_is_refused(source: Path, tmp_path: Path) -> None:
    with h5py.File(source, "r+") as f:
        f.attrs["seed"] = 1000  # the episodes were not reset with these seeds
    with pytest.raises(ValueError, match="does not replay|ended at step"):
        _branch(source, tmp_path / "b.h5")


def test_bad_settings_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="offsets must be >= 1"):
        BranchConfig(offsets=(0, 5))
    with pytest.raises(ValueError, match="first_hold"):
        BranchConfig(first_hold=(4, 2))
    with pytest.raises(ValueError, match="first_hold"):
        BranchConfig(first_hold=(2, 4, 6))
    with pytest.raises(ValueError, match="not the stores' env"):
        _branch(source, tmp_path / "b.h5", env_id="CarRacing-v3")
    branches = _branch(source, tmp_path / "b.h5")
    with pytest.raises(ValueError, match="holds branches"):
        _branch(branches, tmp_path / "bb.h5")
