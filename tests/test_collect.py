"""Collection into the sharded HDF5 store: layout, flags, parallel == serial, resume, errors."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import pytest

from dreamenv.data.collect import _episode_policy, collect, road_centre, shard_dir_for
from dreamenv.data.dataset import hit_flags, open_rollouts
from tests.tiny_envs import HEALTH_ID, MODULE, PIXELS_BOX_ID, PIXELS_ID, VECTOR_ID

PIXELS = f"{MODULE}:{PIXELS_ID}"
PIXELS_BOX = f"{MODULE}:{PIXELS_BOX_ID}"
VECTOR = f"{MODULE}:{VECTOR_ID}"
HEALTH = f"{MODULE}:{HEALTH_ID}"


def _collect(out: Path, episodes: int = 10, env_id: str = PIXELS, **kw: Any) -> Path:
    kw = {"episodes_per_shard": 4, "backend": "serial", "progress": False, **kw}
    return collect(env_id, out, episodes, **kw)


def _contents(path: Path) -> dict[str, np.ndarray]:
    with open_rollouts(path) as r:
        return {**r.load_arrays(), "frames": r.load_frames()}


def _assert_same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_layout_and_attrs(tmp_path: Path) -> None:
    out = _collect(tmp_path / "run" / "rollouts.h5")
    shards = tmp_path / "run" / "rollouts.shards"
    assert out == tmp_path / "run" / "rollouts.h5"
    assert sorted(p.name for p in shards.iterdir()) == [f"shard-0000{k}.h5" for k in range(3)]
    with h5py.File(out, "r") as f:
        assert f["frames"].is_virtual
        assert {m.file_name for m in f["frames"].virtual_sources()} == {
            f"rollouts.shards/shard-0000{k}.h5" for k in range(3)}
        assert f["frames"].dtype == np.uint8 and f["frames"].shape[1:] == (64, 64, 3)
        attrs = dict(f.attrs)
    assert attrs["env_id"] == PIXELS_ID and attrs["num_episodes"] == 10 and attrs["seed"] == 0
    assert attrs["episodes_per_shard"] == 4 and attrs["policy"] == "random" and attrs["complete"]
    assert json.loads(attrs["action_space"]) == {"type": "Discrete", "n": 3, "start": 0}
    assert json.loads(attrs["frame_spec"])["size"] == 64 and attrs["dreamenv_version"]
    with h5py.File(shards / "shard-00002.h5", "r") as f:
        assert f.attrs["complete"] and f.attrs["num_episodes"] == 2
        assert f["frames"].chunks[0] == 64 and f["frames"].compression == "gzip"
        assert f["frames"].maxshape[0] is None
    with open_rollouts(out) as r:
        assert r.num_episodes == 10 and attrs["num_steps"] == r.num_steps
        frames = r.load_frames()
    assert frames.dtype == np.uint8 and frames.shape == (r.num_steps, 64, 64, 3) and frames.std() > 0


def test_episode_flags_consistent(tmp_path: Path) -> None:
    with open_rollouts(_collect(tmp_path / "r.h5", episodes=16)) as r:
        arrays, bounds = r.load_arrays(), r.episode_bounds()
    ends = arrays["terminated"] | arrays["truncated"]
    assert len(bounds) == 16 and bounds[0, 0] == 0 and bounds[-1, 1] == len(ends)
    for start, end in bounds:
        assert arrays["episode_starts"][start] and not arrays["episode_starts"][start + 1:end].any()
        assert ends[end - 1] and not ends[start:end - 1].any()
        assert 5 <= end - start <= 20  # TinyPixels: 5..30 steps, truncated at 20
    assert arrays["terminated"].any() and arrays["truncated"].any()
    assert arrays["actions"].dtype == np.int64 and set(np.unique(arrays["actions"])) <= {0, 1, 2}
    assert (arrays["rewards"] == 1).all() and arrays["rewards"].dtype == np.float32


def test_game_variables_are_stored_with_their_frames(tmp_path: Path) -> None:
    """An env that reports game variables (VizDoom's health) gets them stored as seen with each step's frame."""
    out = _collect(tmp_path / "health.h5", episodes=6, env_id=HEALTH, seed=7)
    with open_rollouts(out) as r, h5py.File(out, "r") as f:
        arrays, bounds, frames = r.load_arrays(), r.episode_bounds(), r.load_frames()
        assert f.attrs["game_variables"] == 1 and f["game_variables"].dtype == np.float32
    env = gym.make(HEALTH_ID)
    hits = 0.0
    for i, (start, end) in enumerate(bounds):
        obs, _ = env.reset(seed=7 + i)
        health = [obs["gamevariables"][0]]
        for action in arrays["actions"][start:end - 1]:
            health.append(env.step(action)[0]["gamevariables"][0])
        np.testing.assert_array_equal(arrays["game_variables"][start:end, 0], health)
        hits += hit_flags(arrays["game_variables"][start:end], arrays["terminated"][start:end]).sum()
    assert hits > len(bounds)  # the health fell before some deaths
    assert frames.shape[0] == len(arrays["game_variables"])
    assert "game_variables" not in _contents(_collect(tmp_path / "pixels.h5", episodes=2))


def test_a_store_from_before_game_variables_resumes_as_it_was(tmp_path: Path) -> None:
    """Stores written before game variables were recorded have none: such a store of an env without them grows
    as before; one of an env with them is refused, since its new shards would hold a column the old ones lack."""
    for env_id, name in ((PIXELS, "pixels.h5"), (HEALTH, "health.h5")):
        out = _collect(tmp_path / name, episodes=4, env_id=env_id)
        for path in [out, *shard_dir_for(out).iterdir()]:
            with h5py.File(path, "a") as f:
                del f.attrs["game_variables"]
        if env_id == PIXELS:
            with open_rollouts(_collect(out, episodes=8, env_id=env_id)) as r:
                assert r.num_episodes == 8
        else:
            with pytest.raises(ValueError, match="game_variables=0, not 1"):
                _collect(out, episodes=8, env_id=env_id)


def test_process_backend_matches_serial(tmp_path: Path) -> None:
    serial = _collect(tmp_path / "serial.h5", episodes=8, episodes_per_shard=2)
    parallel = _collect(tmp_path / "process.h5", episodes=8, episodes_per_shard=2, backend="process", workers=2)
    _assert_same(_contents(serial), _contents(parallel))


def test_resume_after_kill_loses_and_duplicates_nothing(tmp_path: Path) -> None:
    clean = _contents(_collect(tmp_path / "clean.h5", episodes=12))
    out = _collect(tmp_path / "r.h5", episodes=12)
    shards = shard_dir_for(out)
    kept = (shards / "shard-00000.h5").stat().st_mtime_ns
    # A kill mid-run: shard 1 never finished, shard 2 was being written, the index was being replaced.
    (shards / "shard-00001.h5").unlink()
    shutil.move(shards / "shard-00002.h5", shards / "shard-00002.h5.tmp")
    (shards / "shard-00002.h5.tmp").write_bytes(b"half a shard")
    (tmp_path / "r.h5.tmp").write_bytes(b"half an index")
    _collect(out, episodes=12)
    assert not list(tmp_path.rglob("*.tmp"))
    assert (shards / "shard-00000.h5").stat().st_mtime_ns == kept
    _assert_same(clean, _contents(out))


def test_incomplete_shard_is_recollected(tmp_path: Path) -> None:
    clean = _contents(_collect(tmp_path / "clean.h5", episodes=8))
    out = _collect(tmp_path / "r.h5", episodes=8)
    with h5py.File(shard_dir_for(out) / "shard-00001.h5", "r+") as f:
        f.attrs["complete"] = False
    _collect(out, episodes=8)
    _assert_same(clean, _contents(out))


def test_more_episodes_adds_shards(tmp_path: Path) -> None:
    clean = _contents(_collect(tmp_path / "clean.h5", episodes=10))
    out = _collect(tmp_path / "r.h5", episodes=6)
    with open_rollouts(out) as r:
        assert r.num_episodes == 6
    _collect(out, episodes=10)
    assert len(list(shard_dir_for(out).glob("shard-*.h5"))) == 3
    _assert_same(clean, _contents(out))


@pytest.mark.parametrize("change", [{"env_id": PIXELS_BOX}, {"seed": 1}, {"episodes_per_shard": 3}])
def test_resume_into_other_store_raises(tmp_path: Path, change: dict[str, Any]) -> None:
    out = _collect(tmp_path / "r.h5", episodes=4)
    key = next(iter(change))
    with pytest.raises(ValueError, match=f"{key}="):
        _collect(out, episodes=8, **change)


def test_crop_choices(tmp_path: Path) -> None:
    whole = _collect(tmp_path / "whole.h5", episodes=2, crop="none")
    top = _collect(tmp_path / "top.h5", episodes=2, crop=[0, 12, 0, 24])  # a recipe's TOML list
    with open_rollouts(whole) as a, open_rollouts(top) as b:
        assert a.frame_spec.crop is None and b.frame_spec.crop == (0, 12, 0, 24)
        assert a.num_steps == b.num_steps  # the same seeded episodes, seen through another crop
        assert not np.array_equal(a.load_frames(), b.load_frames())
    with pytest.raises(ValueError, match="frame_spec="):
        _collect(top, episodes=4, crop="none")
    for bad in [(12, 0, 0, 24), (0, 12, 0), "dashboard"]:
        with pytest.raises(ValueError, match="crop must be 'env', 'none' or four pixel bounds"):
            _collect(tmp_path / "bad.h5", crop=bad)
    assert not (tmp_path / "bad.shards").exists()


def test_vector_env_needs_from_render(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no image observations.*from-render"):
        _collect(tmp_path / "r.h5", env_id=VECTOR, backend="process")
    assert not (tmp_path / "r.shards").exists()


def test_from_render_and_moved_folder(tmp_path: Path) -> None:
    _collect(tmp_path / "a" / "r.h5", episodes=3, env_id=VECTOR, from_render=True)
    shutil.move(tmp_path / "a", tmp_path / "b")
    with open_rollouts(tmp_path / "b" / "r.h5") as r:
        assert r.frame_spec.from_render and r.num_episodes == 3
        frames = r.load_frames()
    assert frames.shape[1:] == (64, 64, 3) and frames.max() > 0


def test_brownian_box_actions(tmp_path: Path) -> None:
    with open_rollouts(_collect(tmp_path / "r.h5", episodes=4, env_id=PIXELS_BOX, policy="brownian")) as r:
        actions, bounds = r.load_arrays()["actions"], r.episode_bounds()
        assert r.action_space.shape == (2,)
    assert actions.dtype == np.float32 and actions.shape[1:] == (2,)
    assert (np.abs(actions) <= 1).all()
    steps = np.concatenate([np.diff(actions[s:e], axis=0) for s, e in bounds])
    assert np.abs(steps).max() < 1.5  # a random walk, not independent uniform draws


def _run_lengths(actions: np.ndarray) -> np.ndarray:
    """Lengths of the stretches of equal consecutive actions."""
    changes = np.flatnonzero(np.any(actions[1:] != actions[:-1], axis=tuple(range(1, actions.ndim)))) + 1
    return np.diff(np.concatenate([[0], changes, [len(actions)]]))


@pytest.mark.parametrize("env_id", [PIXELS_ID, PIXELS_BOX_ID])
def test_hold_policy_spans_random_play_and_long_holds(env_id: str) -> None:
    env = gym.make(env_id)
    mean_runs = []
    for seed in range(40):
        act = _episode_policy("hold", env, seed)
        actions = np.array([act(None, None) for _ in range(600)])
        assert all(env.action_space.contains(a) for a in actions[:50])
        mean_runs.append(_run_lengths(actions).mean())
    # some episodes play nearly at random, others hold one action for a hundred steps and more
    assert min(mean_runs) < 3 and max(mean_runs) > 100


def always_one(env: Any) -> Any:
    """A policy factory: always action 1."""
    return lambda obs, frame: 1


def test_policy_factory_and_bad_arguments(tmp_path: Path) -> None:
    with open_rollouts(_collect(tmp_path / "r.h5", episodes=2, policy=always_one)) as r:
        assert (r.load_arrays()["actions"] == 1).all()
    with h5py.File(tmp_path / "r.h5", "r") as f:
        assert f.attrs["policy"] == f"{__name__}:always_one"
    with pytest.raises(ValueError, match="unknown policy"):
        _collect(tmp_path / "x.h5", policy="clever")
    with pytest.raises(ValueError, match="unknown compression"):
        _collect(tmp_path / "x.h5", compression="lz5")
    with pytest.raises(ValueError, match="valid backends: serial, process, ray"):
        _collect(tmp_path / "x.h5", backend="threads")


def test_zstd_compression(tmp_path: Path) -> None:
    pytest.importorskip("hdf5plugin")
    clean = _contents(_collect(tmp_path / "gzip.h5", episodes=2))
    _assert_same(clean, _contents(_collect(tmp_path / "zstd.h5", episodes=2, compression="zstd")))


class _CarLike:
    """Just the spaces of CarRacing, for the exploration policies (no Box2D)."""

    def __init__(self, action_low: tuple[float, ...] = (-1, 0, 0), shape: tuple[int, ...] = (96, 96, 3)) -> None:
        self.action_space = gym.spaces.Box(np.array(action_low, np.float32), np.ones(len(action_low), np.float32))
        self.observation_space = gym.spaces.Box(0, 255, shape, np.uint8)


def _track(road_columns: slice | None) -> np.ndarray:
    """A 96 x 96 grass frame with a grey road at road_columns."""
    frame = np.zeros((96, 96, 3), np.uint8)
    frame[...] = (102, 204, 102)
    if road_columns is not None:
        frame[:, road_columns] = (105, 105, 105)
    return frame


def test_road_policy_steers_towards_the_road() -> None:
    """The road policy turns towards the grey road ahead (right, left, or no bias without one), keeps the action
    in CarRacing's Box, and eases off the gas in sharp turns."""
    assert road_centre(_track(slice(60, 76))) == pytest.approx(67.5) and road_centre(_track(None)) is None
    env = _CarLike()

    def first_actions(frame: np.ndarray) -> np.ndarray:
        return np.array([_episode_policy("road", env, seed)(frame, frame) for seed in range(60)])

    right, left, lost = first_actions(_track(slice(60, 76))), first_actions(_track(slice(20, 36))), first_actions(_track(None))
    assert right[:, 0].mean() > 0.7 and left[:, 0].mean() < -0.7 and abs(lost[:, 0].mean()) < 0.2
    for actions in (right, left, lost):
        assert all(env.action_space.contains(a) for a in actions)
    assert (right[np.abs(right[:, 0]) >= 0.3, 1] <= 0.05).all()


@pytest.mark.parametrize("policy", ["drive", "road"])
def test_car_policies_refuse_other_envs(policy: str) -> None:
    with pytest.raises(ValueError, match=f"the {policy} policy is for CarRacing"):
        _episode_policy(policy, _CarLike(action_low=(-1, 0)), 0)
    if policy == "road":
        with pytest.raises(ValueError, match="96 x 96 x 3 frames"):
            _episode_policy(policy, _CarLike(shape=(64, 64, 3)), 0)
