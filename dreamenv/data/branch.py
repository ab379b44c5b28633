"""Branches near deaths: replay a store's dying episodes up to a few steps before each death, then act otherwise.

Random play seldom shows what another action would have done at the moment an agent died, and an agent's own games
show only what it did. An env that replays a seed and an action sequence exactly (VizDoom, Box2D) can be rewound by
replaying, so each recorded death gives one new episode per offset d: the `context` recorded steps before step
T - d, then a random action held `first_hold` steps and the brownian policy, until the game ends or `suffix` steps.
M trained on them sees, from the same states, actions that die and actions that live.
"""
from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
from tqdm.auto import tqdm

from dreamenv.data.collect import (
    GAME_VARIABLES_KEY, ShardResult, _bare_env_id, _brownian_policy, _check_index_identity, _columns, _IndexWriter,
    _make_env, _remove_stale_tmp, _scan_complete_shards, _ShardWriter, compression_kwargs, game_variable_count,
    shard_dir_for, shard_path,
)
from dreamenv.data.dataset import open_rollouts
from dreamenv.data.mirror import MIRROR_PREFIX
from dreamenv.data.preprocess import FrameSpec, extract_frame
from dreamenv.parallel import BACKENDS, run_tasks
from dreamenv.spaces import space_to_json


@dataclass(frozen=True)
class BranchConfig:
    """Where each death is branched and how much of it is kept."""

    offsets: tuple[int, ...] = (8, 15, 25, 40, 60, 90)  # branch this many steps before each death
    context: int = 150  # recorded steps kept before the branch point (M's warm-up)
    suffix: int = 300  # steps at most after the branch point
    first_hold: tuple[int, int] = (5, 30)  # the first other action is held this many steps (both included)

    def __post_init__(self) -> None:
        if not self.offsets or min(self.offsets) < 1 or self.context < 0 or self.suffix < 1:
            raise ValueError(f"branch offsets must be >= 1, context >= 0 and suffix >= 1, got {self}")
        if len(self.first_hold) != 2 or not 1 <= self.first_hold[0] <= self.first_hold[1]:
            raise ValueError(f"first_hold must be (low, high) with 1 <= low <= high, got {self.first_hold}")

    def branches(self, length: int) -> list[int]:
        """The branch points (steps) of an episode of `length` steps that ends in a death."""
        return [length - d for d in self.offsets if d < length]


@dataclass(frozen=True)
class SourceEpisode:
    """A recorded episode that ends in a death: its rows in the store and the seed it was reset with."""

    store: str
    start: int
    length: int
    seed: int


@dataclass(frozen=True)
class BranchTask:
    """Everything a worker needs to write one shard of branches (picklable)."""

    env_id: str
    frame_spec: dict[str, Any]
    episodes: tuple[SourceEpisode, ...]
    config: BranchConfig
    seed: int
    shard: int
    path: str
    compression: str
    attrs: dict[str, Any]


def dying_episodes(stores: Sequence[str | Path]) -> tuple[list[SourceEpisode], dict[str, Any]]:
    """The episodes of `stores` that end in a death (terminated), with their reset seeds (the store's seed + index),
    and the stores' common env_id, frame_spec and action_space attributes."""
    episodes, common = [], None
    for store in stores:
        with open_rollouts(store) as r, h5py.File(store, "r") as f:
            attrs = {key: f.attrs.get(key) for key in ("env_id", "frame_spec", "action_space", "seed", "policy")}
            if any(value is None for value in attrs.values()):
                raise ValueError(f"{store}: no env_id, frame_spec, action_space, seed or policy attribute; branch stores "
                                 "written by `dreamenv collect`, whose episode i was reset with seed + i")
            attrs = {key: value.decode() if isinstance(value, bytes) else value for key, value in attrs.items()}
            policy = str(attrs.pop("policy"))
            if policy.startswith("branch:"):
                raise ValueError(f"{store} holds branches, which do not start at a reset: branch the stores they "
                                 "came from")
            if policy.startswith(MIRROR_PREFIX):
                raise ValueError(f"{store} holds mirrored episodes, which the game does not replay: branch the store "
                                 "they mirror, then mirror the branches")
            seed = int(attrs.pop("seed"))
            if common is not None and attrs != common:
                raise ValueError(f"{store}: another env, frame rule or action space than {stores[0]}; branch one "
                                 "env's stores at a time")
            common = attrs
            terminated = f["terminated"][:]
            for i, (lo, hi) in enumerate(r.episode_bounds()):
                if terminated[hi - 1]:
                    episodes.append(SourceEpisode(str(Path(store).resolve()), int(lo), int(hi - lo), seed + i))
    return episodes, common


def collect_branches(
    stores: Sequence[str | Path],
    out: str | Path,
    config: BranchConfig = BranchConfig(),
    workers: int = 2,
    seed: int = 0,
    episodes_per_shard: int = 10,
    backend: str = "process",
    env_id: str | None = None,
    progress: bool = True,
    compression: str = "gzip",
) -> Path:
    """Branch every death of `stores` (see the module docstring) into the store `out`; resumes; returns out.

    episodes_per_shard counts source deaths per shard. env_id: the stores' env, with a "module:" prefix to import
    in the workers if it registers there (default: the stores' env_id).
    """
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    if episodes_per_shard < 1:
        raise ValueError(f"episodes_per_shard must be >= 1, got {episodes_per_shard}")
    compression_kwargs(compression)
    sources, attrs = dying_episodes(stores)
    if env_id is not None and _bare_env_id(env_id) != attrs["env_id"]:
        raise ValueError(f"env_id {env_id!r} is not the stores' env {attrs['env_id']!r}")
    if not sources:
        raise ValueError(f"no episode of {', '.join(map(str, stores))} ends in a death (terminated): nothing to branch")
    frame_spec = json.loads(attrs["frame_spec"])
    probe = _make_env(env_id or attrs["env_id"], frame_spec.get("from_render", False))
    action_space, variables = probe.action_space, game_variable_count(probe.observation_space)
    probe.close()
    if json.dumps(space_to_json(action_space)) != attrs["action_space"]:
        raise ValueError(f"the env's action space {action_space} is not the stores' {attrs['action_space']}")
    out = Path(out)
    shard_dir = shard_dir_for(out)
    recipe = {"branch": asdict(config), "stores": sorted({s.store for s in sources})}
    identity = {"env_id": attrs["env_id"], "seed": int(seed), "episodes_per_shard": int(episodes_per_shard),
                "policy": "branch:" + json.dumps(recipe), "frame_spec": attrs["frame_spec"],
                "action_space": attrs["action_space"], "game_variables": variables}
    _check_index_identity(out, identity)
    shard_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out, shard_dir)
    chunks = [tuple(sources[k:k + episodes_per_shard]) for k in range(0, len(sources), episodes_per_shard)]
    plan = {k: (k * episodes_per_shard, sum(len(config.branches(e.length)) for e in chunk))
            for k, chunk in enumerate(chunks)}
    done = _scan_complete_shards(shard_dir, plan, identity)
    tasks = [BranchTask(env_id or attrs["env_id"], frame_spec, chunk, config, int(seed), k,
                        str(shard_path(shard_dir, k)), compression, identity)
             for k, chunk in enumerate(chunks) if k not in done]
    index = _IndexWriter(out, shard_dir, plan, FrameSpec.from_json(frame_spec), action_space, identity)
    index.write(done)
    with tqdm(total=len(sources), initial=sum(len(chunks[k]) for k in done), unit="death",
              desc=f"branch {attrs['env_id']}", disable=not progress) as bar:
        for result in run_tasks(branch_shard, tasks, backend=backend, workers=workers):
            done[result.shard] = result.num_steps
            index.write(done)
            bar.update(len(chunks[result.shard]))
    return out


def branch_shard(task: BranchTask) -> ShardResult:
    """Worker: write the branches of the task's deaths to <shard>.tmp, then rename to the shard file."""
    spec = FrameSpec.from_json(task.frame_spec)
    env = _make_env(task.env_id, spec.from_render)
    try:
        columns = _columns(spec, env.action_space, game_variable_count(env.observation_space))
        tmp = task.path + ".tmp"
        count = 0
        with h5py.File(tmp, "w") as f:
            writer = _ShardWriter(f, columns, compression_kwargs(task.compression))
            for source in task.episodes:
                with h5py.File(source.store, "r") as store:
                    rows = slice(source.start, source.start + source.length)
                    actions, frames = store["actions"][rows], store["frames"][rows]
                for point in task.config.branches(source.length):
                    rng = np.random.default_rng([task.seed, source.seed, point])
                    writer.append(_branch(env, spec, columns, source, actions, frames, point, task.config, rng))
                    count += 1
            f.attrs.update(task.attrs)
            f.attrs.update(shard=task.shard, first_episode=task.shard * task.attrs["episodes_per_shard"], num_episodes=count,
                           num_steps=writer.length, complete=True)
            length = writer.length
        os.replace(tmp, task.path)
    finally:
        env.close()
    return ShardResult(task.shard, count, length)


def _branch(env: gym.Env, spec: FrameSpec, columns: dict[str, tuple[tuple[int, ...], np.dtype]],
            source: SourceEpisode, actions: np.ndarray, frames: np.ndarray, point: int, config: BranchConfig,
            rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One branch: replay `actions` to step `point`, then other actions; keeps the steps from point - context on."""
    first = max(0, point - config.context)
    other = _other_actions(env.action_space, rng, config.first_hold)
    action_shape = columns["actions"][0]
    kept: dict[str, list] = {name: [] for name in columns if name != "episode_starts"}
    obs, _ = env.reset(seed=source.seed)
    terminated = truncated = False
    step = 0
    while not (terminated or truncated) and step < point + config.suffix:
        action = actions[step] if step < point else other()
        if step >= first:
            frame = extract_frame(obs, env, spec)
            if step < point and not np.array_equal(frame, frames[step]):
                raise ValueError(
                    f"{source.store}: the episode reset with seed {source.seed} does not replay: its frame at step "
                    f"{step} differs from the recorded one. Branching needs an env that replays a seed and its "
                    "actions exactly, and a store written by `dreamenv collect`.")
            kept["frames"].append(frame)
            if "game_variables" in columns:
                kept["game_variables"].append(np.ravel(obs[GAME_VARIABLES_KEY]))
        obs, reward, terminated, truncated, _ = env.step(action)
        if step >= first:
            kept["actions"].append(np.reshape(action, action_shape))
            kept["rewards"].append(reward)
            kept["terminated"].append(terminated)
            kept["truncated"].append(truncated)
        step += 1
        if step <= point and (terminated or truncated):
            raise ValueError(f"{source.store}: the episode reset with seed {source.seed} ended at step {step} on "
                             f"replay, not at {source.length}: the env does not replay its seed and actions exactly")
    if not (terminated or truncated):
        kept["truncated"][-1] = True  # cut off after `suffix` steps
    episode = {name: np.asarray(values, dtype=columns[name][1]) for name, values in kept.items()}
    episode["episode_starts"] = np.zeros(len(episode["frames"]), dtype=bool)
    episode["episode_starts"][0] = True
    return episode


def _other_actions(space: gym.Space, rng: np.random.Generator, hold: tuple[int, int]) -> Callable[[], Any]:
    """A random action held hold[0]..hold[1] steps, then the brownian policy of `dreamenv collect`."""
    space.seed(int(rng.integers(2**31)))
    held, left = space.sample(), int(rng.integers(hold[0], hold[1] + 1))
    brownian = _brownian_policy(space, rng)

    def act() -> Any:
        nonlocal left
        if left > 0:
            left -= 1
            return held
        return brownian(None, None)

    return act
