"""Mirrored stores: frames flipped, actions mapped, the rest as recorded; resume; clear errors."""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest

from dreamenv.cli import main
from dreamenv.data.branch import dying_episodes
from dreamenv.data.collect import collect, shard_dir_for
from dreamenv.data.dataset import open_rollouts
from dreamenv.data.mirror import mirror_action_map, mirror_store
from tests.tiny_envs import HEALTH_ID, MODULE, PIXELS_BOX_ID

HEALTH = f"{MODULE}:{HEALTH_ID}"
BOX = f"{MODULE}:{PIXELS_BOX_ID}"


def _all(path: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    with open_rollouts(path) as r:
        return r.load_arrays(), r.load_frames()


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return collect(HEALTH, tmp_path / "src.h5", 10, episodes_per_shard=4, backend="serial", progress=False, seed=3)


def test_the_mirror_flips_frames_and_maps_actions(source: Path, tmp_path: Path) -> None:
    out = mirror_store(source, tmp_path / "m.h5", [0, 2, 1], episodes_per_shard=3, progress=False)
    (arrays, frames), (mirrored, flipped) = _all(source), _all(out)
    np.testing.assert_array_equal(flipped, frames[:, :, ::-1])
    assert not np.array_equal(flipped, frames)  # the dot is off centre somewhere: flipping changes the frames
    np.testing.assert_array_equal(mirrored["actions"], np.array([0, 2, 1])[arrays["actions"]])
    assert set(arrays) == set(mirrored)
    for name in set(arrays) - {"actions"}:  # rewards, ends, episode starts and the health, as recorded
        np.testing.assert_array_equal(mirrored[name], arrays[name], err_msg=name)
    with h5py.File(out, "r") as f:
        assert f.attrs["complete"] and f.attrs["num_episodes"] == 10 and f.attrs["policy"].startswith("mirror:")
    twice = mirror_store(out, tmp_path / "mm.h5", [0, 2, 1], progress=False)
    again, restored = _all(twice)
    np.testing.assert_array_equal(restored, frames)
    np.testing.assert_array_equal(again["actions"], arrays["actions"])


def test_box_actions_change_sign_where_the_map_says(tmp_path: Path) -> None:
    source = collect(BOX, tmp_path / "src.h5", 3, backend="serial", progress=False)
    out = mirror_store(source, tmp_path / "m.h5", [-1, 1], progress=False)
    (arrays, _), (mirrored, _) = _all(source), _all(out)
    np.testing.assert_array_equal(mirrored["actions"], arrays["actions"] * np.array([-1, 1], dtype=np.float32))


def test_resume_writes_only_the_missing_shard(source: Path, tmp_path: Path) -> None:
    out = mirror_store(source, tmp_path / "m.h5", [0, 2, 1], episodes_per_shard=3, progress=False)
    before = _all(out)
    shards = sorted(shard_dir_for(out).glob("shard-*.h5"))
    assert len(shards) == 4
    shards[2].unlink()
    untouched = shards[0].stat().st_mtime_ns
    after = _all(mirror_store(source, out, [0, 2, 1], episodes_per_shard=3, progress=False))
    assert shards[0].stat().st_mtime_ns == untouched and shards[2].exists()
    for name in before[0]:
        np.testing.assert_array_equal(after[0][name], before[0][name], err_msg=name)
    np.testing.assert_array_equal(after[1], before[1])
    with pytest.raises(ValueError, match="holds rollouts with policy"):  # another map is another store
        mirror_store(source, out, [2, 1, 0], episodes_per_shard=3, progress=False)


def test_bad_maps_and_stores_are_refused(source: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="permutation"):
        mirror_action_map(gym.spaces.Discrete(3), [0, 2])
    with pytest.raises(ValueError, match="does not undo itself"):
        mirror_action_map(gym.spaces.Discrete(3), [1, 2, 0])
    with pytest.raises(ValueError, match="a sign"):
        mirror_action_map(gym.spaces.Box(-1, 1, (3,)), [-1, 0.5, 1])
    with pytest.raises(ValueError, match="not symmetric"):
        mirror_action_map(gym.spaces.Box(np.array([-1, 0]), np.array([1, 1]), dtype=np.float32), [1, -1])
    np.testing.assert_array_equal(mirror_action_map(gym.spaces.Discrete(3, start=1), [1, 3, 2]), [1, 3, 2])
    with pytest.raises(ValueError, match="is the store itself"):
        mirror_store(source, source, [0, 2, 1], progress=False)
    out = mirror_store(source, tmp_path / "m.h5", [0, 2, 1], progress=False)
    with pytest.raises(ValueError, match="mirrored episodes"):
        dying_episodes([out])
    next(shard_dir_for(source).glob("shard-*.h5")).unlink()
    with pytest.raises(ValueError, match="is missing"):
        mirror_store(source, tmp_path / "n.h5", [0, 2, 1], progress=False)


def test_the_command_writes_a_store_and_names_a_bad_map(source: Path, tmp_path: Path, capsys) -> None:
    assert main(["mirror", str(source), "--out", str(tmp_path / "m.h5"), "--action-map", "0,2,1"]) == 0
    assert "mirrored:" in capsys.readouterr().out
    with open_rollouts(tmp_path / "m.h5") as r:
        assert r.num_episodes == 10
    assert main(["mirror", str(source), "--out", str(tmp_path / "n.h5"), "--action-map", "left,right"]) == 2
    assert "--action-map must be comma-separated numbers" in capsys.readouterr().err
