"""Mirrored rollouts: a store's episodes with every frame flipped left to right and every action replaced by its
mirror image. In a game whose world is symmetric (TakeCover's room) a mirrored episode is one the game could have
played, so M trained on both sides cannot learn a dream that favours one side, which its agents then exploit."""
from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
from tqdm.auto import tqdm

from dreamenv.data.collect import (
    _check_index_identity, _columns, _IndexWriter, _package_version, _plan_shards,
    _remove_stale_tmp, _scan_complete_shards, _ShardWriter, compression_kwargs, shard_dir_for, shard_path,
)
from dreamenv.data.dataset import _attr, open_rollouts
from dreamenv.spaces import space_to_json

MIRROR_PREFIX = "mirror:"  # a mirrored store's policy attribute starts so: its episodes do not replay from their seeds


def mirror_action_map(space: gym.Space, values: Sequence[float]) -> np.ndarray:
    """The action map `values` checked against `space`: for Discrete(n), the mirror image of each action in order (a
    permutation that undoes itself, TakeCover's none, right, left: 0,2,1); for Box, a sign per dimension (CarRacing's
    steer/gas/brake: -1,1,1)."""
    values = list(values)
    shown = ",".join(f"{v:g}" for v in values)
    if isinstance(space, gym.spaces.Discrete):
        start, n = int(space.start), int(space.n)
        actions = list(range(start, start + n))
        if len(values) != n or sorted(values) != actions or any(v != int(v) for v in values):
            raise ValueError(f"a Discrete({n}) action map lists the mirror image of each action {actions} in order, "
                             f"a permutation of them; got {shown} (TakeCover's none, right, left: 0,2,1)")
        mapping = np.array(values, dtype=np.int64)
        if not np.array_equal(mapping[mapping - start], np.array(actions)):
            raise ValueError(f"the action map {shown} does not undo itself: mirroring twice must give each action "
                             "back (swap pairs of actions, keep the rest)")
        return mapping
    if isinstance(space, gym.spaces.Box):
        size = int(np.prod(space.shape))
        if len(values) != size or any(v not in (-1.0, 1.0) for v in values):
            raise ValueError(f"a Box action map gives each of the {size} action dimensions a sign, -1 (mirrored) or 1; "
                             f"got {shown} (CarRacing's steer, gas, brake: -1,1,1)")
        signs = np.array(values, dtype=np.float32).reshape(space.shape)
        flipped = signs < 0
        if np.any(space.low[flipped] != -space.high[flipped]):
            raise ValueError(f"the action map {shown} negates a dimension whose bounds are not symmetric about 0 "
                             f"({space}): its mirrored actions would leave the space")
        return signs
    raise ValueError(f"mirroring supports Discrete and Box action spaces, not {space}")


def mirror_actions(space: gym.Space, action_map: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """Stored actions (N, ...) -> their mirror images under a checked action map."""
    if isinstance(space, gym.spaces.Discrete):
        return action_map[actions - int(space.start)]
    return (actions * action_map).astype(actions.dtype)


def mirror_store(
    store: str | Path,
    out: str | Path,
    action_map: Sequence[float],
    episodes_per_shard: int = 8,
    compression: str = "gzip",
    progress: bool = True,
) -> Path:
    """Write the mirror image of every episode of `store` to the store `out` (frames flipped left to right, actions
    mapped by `action_map`, everything else as recorded); resumes; returns out."""
    if episodes_per_shard < 1:
        raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
    compression_kwargs(compression)
    store, out = Path(store), Path(out)
    if out.resolve() == store.resolve():
        raise ValueError(f"--out {out} is the store itself: write the mirror image to another file")
    with open_rollouts(store) as source, h5py.File(store, "r") as f:
        if source.env_id is None or source.frame_spec is None or source.action_space is None:
            raise ValueError(f"{store}: no env_id, frame_spec or action_space attribute; mirror stores written by "
                             "`dreamenv collect`")
        space, spec = source.action_space, source.frame_spec
        mapping = mirror_action_map(space, action_map)
        arrays = source.load_arrays()
        recipe = {"store": str(store.resolve()), "policy": str(_attr(f, "policy", "")),
                  "action_map": [float(v) for v in action_map]}
        identity = {"env_id": source.env_id, "seed": int(_attr(f, "seed", 0)),
                    "episodes_per_shard": int(episodes_per_shard), "policy": MIRROR_PREFIX + json.dumps(recipe),
                    "frame_spec": json.dumps(spec.to_json()), "action_space": json.dumps(space_to_json(space)),
                    "game_variables": arrays["game_variables"].shape[1] if "game_variables" in arrays else 0}
        _check_index_identity(out, identity)
        shard_dir = shard_dir_for(out)
        shard_dir.mkdir(parents=True, exist_ok=True)
        _remove_stale_tmp(out, shard_dir)
        bounds = source.episode_bounds()
        plan = _plan_shards(len(bounds), episodes_per_shard)
        done = _scan_complete_shards(shard_dir, plan, identity)
        index = _IndexWriter(out, shard_dir, plan, spec, space, identity)
        index.write(done)
        columns = _columns(spec, space, identity["game_variables"])
        with tqdm(total=len(bounds), initial=sum(plan[k][1] for k in done), unit="episode",
                  desc=f"mirror {store.name}", disable=not progress) as bar:
            for k, (first, count) in plan.items():
                if k in done:
                    continue
                lo, hi = int(bounds[first][0]), int(bounds[first + count - 1][1])
                episode = {name: arrays[name][lo:hi] for name in columns if name != "frames"}
                episode["frames"] = np.ascontiguousarray(source.load_frames(np.arange(lo, hi))[:, :, ::-1])
                episode["actions"] = mirror_actions(space, mapping, episode["actions"])
                done[k] = _write_shard(shard_path(shard_dir, k), columns, episode, compression,
                                       {**identity, "shard": k, "first_episode": first, "num_episodes": count})
                index.write(done)
                bar.update(count)
    return out


def _write_shard(path: Path, columns: dict[str, tuple[tuple[int, ...], np.dtype]], arrays: dict[str, np.ndarray],
                 compression: str, attrs: dict[str, Any]) -> int:
    """Write one shard's arrays to <path>.tmp, then rename it to path; returns its steps."""
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w") as f:
        writer = _ShardWriter(f, columns, compression_kwargs(compression))
        writer.append(arrays)
        f.attrs.update(attrs)
        f.attrs.update(num_steps=writer.length, dreamenv_version=_package_version(), complete=True)
        length = writer.length
    tmp.replace(path)
    return length
