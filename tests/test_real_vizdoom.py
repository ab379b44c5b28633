"""A short real ViZDoom collection (slow: runs the game engine in two spawned workers)."""
from __future__ import annotations

from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

from dreamenv.data.collect import collect
from dreamenv.data.dataset import open_rollouts

pytest.importorskip("vizdoom")
import vizdoom.gymnasium_wrapper  # noqa: E402,F401  (registers the Vizdoom* ids in this process)

pytestmark = pytest.mark.slow


def test_collect_vizdoom_take_cover(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # ViZDoom writes _vizdoom.ini into the working directory of its workers
    out = collect("VizdoomTakeCover-v1", tmp_path / "r.h5", episodes=2, workers=2, episodes_per_shard=1,
                  progress=False)
    with open_rollouts(out) as rollouts:
        assert rollouts.env_id == "VizdoomTakeCover-v1" and rollouts.num_episodes == 2
        assert rollouts.frame_spec.image_key == "screen"  # ViZDoom's Dict observation
        bounds = rollouts.episode_bounds()
        arrays = rollouts.load_arrays()
        frames = rollouts.load_frames()
    assert frames.dtype == np.uint8 and frames.shape == (rollouts.num_steps, 64, 64, 3)
    assert frames.std() > 0  # a real picture, not a blank
    assert bounds.shape == (2, 2) and bounds[0, 0] == 0 and bounds[1, 1] == len(frames)
    ends = arrays["terminated"] | arrays["truncated"]
    for start, stop in bounds:
        assert stop - start > 1
        assert ends[stop - 1] and not ends[start : stop - 1].any()  # each episode ends once, at its last step
    assert arrays["actions"].shape[0] == len(frames)
    space = rollouts.action_space
    assert space == gym.make("VizdoomTakeCover-v1").action_space
    assert all(space.contains(int(a)) for a in np.unique(arrays["actions"]))


def test_vizdoom_working_directory_is_made_before_the_engine_starts(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """Workers starting together in a fresh directory must not race to create ViZDoom's _vizdoom/."""
    import dreamenv.data.sources as sources

    monkeypatch.chdir(tmp_path)
    seen = []
    monkeypatch.setattr(sources.gym, "make", lambda env_id, **kw: seen.append(Path("_vizdoom").is_dir()))
    sources.make_source_env("VizdoomTakeCover-v1")
    assert seen == [True]
