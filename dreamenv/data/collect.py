"""Rollouts of any Gymnasium env into sharded HDF5 with a virtual index: resumable, parallel, seeded."""
from __future__ import annotations

import importlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
from tqdm.auto import tqdm

from dreamenv.data.preprocess import FrameSpec, extract_frame, frame_spec_for
from dreamenv.data.sources import make_source_env
from dreamenv.parallel import BACKENDS, run_tasks
from dreamenv.spaces import space_to_json

PolicyFn = Callable[[Any, np.ndarray], Any]
PolicyFactory = Callable[[gym.Env], PolicyFn]

FRAME_CHUNK = 64  # steps per frames chunk (~750 kB raw at 64x64x3)
ARRAY_CHUNK = 1024  # steps per chunk of the small per-step arrays
# Attributes that must match for shards to belong to one store.
IDENTITY_ATTRS = ("env_id", "seed", "episodes_per_shard", "policy", "frame_spec", "action_space", "game_variables")
IDENTITY_DEFAULTS = {"game_variables": 0}  # stores written before game variables were recorded have none
GAME_VARIABLES_KEY = "gamevariables"  # the Dict observation's key of VizDoom's game variables (TakeCover: health)


@dataclass(frozen=True)
class ShardTask:
    """Everything a worker needs to write one shard (picklable)."""

    env_id: str  # may carry a "module:" prefix to import in the worker
    from_render: bool
    policy: str | PolicyFactory
    crop: str | tuple[int, ...]
    seed: int
    shard: int
    first_episode: int
    num_episodes: int
    path: str
    compression: str
    attrs: dict[str, Any]


@dataclass(frozen=True)
class ShardResult:
    """What a worker wrote: shard number, episodes and steps."""

    shard: int
    num_episodes: int
    num_steps: int


def collect(
    env_id: str,
    out: str | Path,
    episodes: int,
    workers: int = 2,
    policy: str | PolicyFactory = "random",
    from_render: bool = False,
    seed: int = 0,
    episodes_per_shard: int = 8,
    backend: str = "process",
    controller: str | None = None,
    bundle: str | None = None,
    algo: str = "linear",
    epsilon: float = 0.0,
    progress: bool = True,
    compression: str = "gzip",
    crop: str | Sequence[int] = "env",
) -> Path:
    """Collect `episodes` rollouts of `env_id` into `out` (an HDF5 index over shards); resumes; returns out.

    crop: "env" (the env's rule: CarRacing drops its dashboard), "none" (the whole frame) or (top, bottom, left,
    right) pixel bounds. A controller policy sees frames through its bundle's V, so it collects with the bundle's crop.
    algo says what `controller` is: "linear" (a controller) or a `dreamenv train-agent` agent's algo (actor-critic, ...).
    epsilon: with a controller policy, the probability of a random action at each step (exploration around it).
    """
    if episodes < 1 or episodes_per_shard < 1:
        raise ValueError(f"episodes and episodes_per_shard must be >= 1, got {episodes}, {episodes_per_shard}")
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
    compression_kwargs(compression)  # fail early on an unusable codec
    policy = _resolve_policy(policy, controller, bundle, algo, epsilon)
    policy_name = _policy_name(policy)
    crop = _controller_crop(policy, crop) if hasattr(policy, "bundle") else crop  # a policy that sees through a bundle
    crop = crop if isinstance(crop, str) else tuple(crop)
    frame_spec, action_space, variables = _probe_env(env_id, from_render, crop)
    out = Path(out)
    shard_dir = shard_dir_for(out)
    identity = {
        "env_id": _bare_env_id(env_id),
        "seed": int(seed),
        "episodes_per_shard": int(episodes_per_shard),
        "policy": policy_name,
        "frame_spec": json.dumps(frame_spec.to_json()),
        "action_space": json.dumps(space_to_json(action_space)),
        "game_variables": variables,
    }
    _check_index_identity(out, identity)
    shard_dir.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp(out, shard_dir)
    plan = _plan_shards(episodes, episodes_per_shard)
    done = _scan_complete_shards(shard_dir, plan, identity)
    tasks = [
        ShardTask(env_id, from_render, policy, crop, int(seed), k, first, count,
                  str(shard_path(shard_dir, k)), compression, identity)
        for k, (first, count) in plan.items()
        if k not in done
    ]
    index = _IndexWriter(out, shard_dir, plan, frame_spec, action_space, identity)
    index.write(done)
    initial = sum(plan[k][1] for k in done)
    with tqdm(total=episodes, initial=initial, unit="episode", desc=f"collect {identity['env_id']}",
              disable=not progress) as bar:
        for result in run_tasks(collect_shard, tasks, backend=backend, workers=workers):
            done[result.shard] = result.num_steps
            index.write(done)
            bar.update(result.num_episodes)
    return out


def shard_dir_for(out: Path) -> Path:
    """The shard folder next to the index: runs/x/rollouts.h5 -> runs/x/rollouts.shards."""
    return out.with_name(out.stem + ".shards")


def shard_path(shard_dir: Path, shard: int) -> Path:
    """The file of shard number `shard`."""
    return shard_dir / f"shard-{shard:05d}.h5"


def compression_kwargs(compression: str) -> dict[str, Any]:
    """h5py create_dataset keywords for "gzip" (level 4), "zstd" (hdf5plugin) or "none"."""
    if compression == "gzip":
        return {"compression": "gzip", "compression_opts": 4}
    if compression == "none":
        return {}
    if compression == "zstd":
        try:
            import hdf5plugin
        except ImportError as err:
            raise gym.error.DependencyNotInstalled(
                "compression='zstd' needs hdf5plugin: pip install hdf5plugin (or use compression='gzip')"
            ) from err
        return dict(hdf5plugin.Zstd())
    raise ValueError(f"unknown compression {compression!r}; use 'gzip', 'zstd' or 'none'")


def _bare_env_id(env_id: str) -> str:
    """The registered id without a Gymnasium-style "module:" prefix."""
    return env_id.partition(":")[2] if ":" in env_id else env_id


def _make_env(env_id: str, from_render: bool) -> gym.Env:
    """Import the "module:" prefix if any (registers the id), then make the source env."""
    if ":" in env_id:
        importlib.import_module(env_id.partition(":")[0])
    return make_source_env(_bare_env_id(env_id), render_mode="rgb_array" if from_render else None)


def _probe_env(env_id: str, from_render: bool, crop: str | tuple[int, ...]) -> tuple[FrameSpec, gym.Space, int]:
    """Make the env once in this process: frame spec (clear error if no images or a bad crop), action space and
    number of game variables."""
    env = _make_env(env_id, from_render)
    try:
        spec = frame_spec_for(env, from_render, crop)
        space_to_json(env.action_space)  # unsupported action spaces fail here, not in a worker
        return spec, env.action_space, game_variable_count(env.observation_space)
    finally:
        env.close()


def game_variable_count(space: gym.Space) -> int:
    """How many game variables a Dict observation carries beside its image (VizDoom's "gamevariables"), else 0."""
    if isinstance(space, gym.spaces.Dict) and GAME_VARIABLES_KEY in space.spaces:
        return int(np.prod(space[GAME_VARIABLES_KEY].shape))
    return 0


def _resolve_policy(policy: str | PolicyFactory, controller: str | None, bundle: str | None, algo: str,
                    epsilon: float) -> str | PolicyFactory:
    """'controller' becomes a ControllerPolicy (the controller, or the agent of `algo`, seeing frames through its
    bundle's V and M, with epsilon-random actions)."""
    if policy != "controller":
        if epsilon:
            raise ValueError("epsilon adds random actions to a trained policy: use it with policy 'controller'")
        return policy
    if not controller or not bundle:
        raise ValueError("policy 'controller' needs a controller and its bundle: --controller DIR --bundle BUNDLE")
    from dreamenv.agents.controller import ControllerPolicy
    from dreamenv.compare import load_policy
    from dreamenv.registry import resolve_agent, resolve_bundle, resolve_controller

    bundle_dir = resolve_bundle(bundle)
    load_policy(controller, algo, bundle_dir)  # fail here, not in a worker: unknown algo, wrong kind or bundle
    resolve = resolve_controller if algo == "linear" else resolve_agent
    return ControllerPolicy(str(bundle_dir), str(resolve(controller)), algo, epsilon)


def _controller_crop(policy: Any, crop: str | Sequence[int]) -> str | Sequence[int]:
    """The crop of a controller policy's bundle; another explicit crop is refused (its V would see foreign frames)."""
    from dreamenv.registry import load_world_model

    bundle_crop = load_world_model(policy.bundle).frame_spec.crop
    if crop != "env" and (None if crop == "none" else tuple(crop)) != bundle_crop:
        raise ValueError(f"crop {crop!r} differs from the crop {bundle_crop} of the controller's bundle {policy.bundle}, "
                         "whose V only knows frames cropped its way: drop the crop option")
    return "none" if bundle_crop is None else bundle_crop


def _policy_name(policy: str | PolicyFactory) -> str:
    """The name stored in the file; validates the policy choice."""
    if hasattr(policy, "name"):
        return str(policy.name)
    if callable(policy):
        return f"{policy.__module__}:{policy.__qualname__}"
    if policy in ("random", "brownian", "hold", "drive", "road"):
        return policy
    raise ValueError(f"unknown policy {policy!r}; use 'random', 'brownian', 'hold', 'drive', 'road', 'controller' or a policy "
                     "factory callable")


def _plan_shards(episodes: int, per_shard: int) -> dict[int, tuple[int, int]]:
    """Shard number -> (first episode, episode count)."""
    return {
        k: (first, min(per_shard, episodes - first))
        for k, first in enumerate(range(0, episodes, per_shard))
    }


def _check_identity(found: dict[str, Any], identity: dict[str, Any], where: Path) -> None:
    """Refuse to mix rollouts of another env, seed, shard size, policy or frame rule."""
    for key in IDENTITY_ATTRS:
        old = found.get(key, IDENTITY_DEFAULTS.get(key))
        if isinstance(old, bytes):
            old = old.decode()
        if isinstance(old, np.generic):
            old = old.item()
        if old != identity[key]:
            raise ValueError(
                f"{where} holds rollouts with {key}={old!r}, not {identity[key]!r}; "
                "collect into another --out, or delete the old rollouts first."
            )


def _check_index_identity(out: Path, identity: dict[str, Any]) -> None:
    """An existing readable index must describe the same store."""
    if not out.exists():
        return
    try:
        with h5py.File(out, "r") as f:
            attrs = dict(f.attrs)
    except OSError:
        return  # unreadable index: it is rewritten from the shards
    _check_identity(attrs, identity, out)


def _remove_stale_tmp(out: Path, shard_dir: Path) -> None:
    """Delete temporary files a killed run left behind."""
    for tmp in [*shard_dir.glob("shard-*.h5.tmp"), out.with_name(out.name + ".tmp")]:
        tmp.unlink(missing_ok=True)


def _scan_complete_shards(
    shard_dir: Path, plan: dict[int, tuple[int, int]], identity: dict[str, Any]
) -> dict[int, int]:
    """Shard number -> steps for the planned shards already on disk and complete."""
    done = {}
    for path in sorted(shard_dir.glob("shard-*.h5")):
        try:
            with h5py.File(path, "r") as f:
                attrs = dict(f.attrs)
                length = len(f["frames"])
        except (OSError, KeyError):
            continue  # unreadable: recollected if planned
        _check_identity(attrs, identity, path)
        k = int(attrs["shard"])
        if (
            k in plan
            and bool(attrs.get("complete", False))
            and int(attrs["num_episodes"]) == plan[k][1]
            and int(attrs["num_steps"]) == length
        ):
            done[k] = length
    return done


class _IndexWriter:
    """Rewrites the index (virtual datasets over complete shards) atomically."""

    def __init__(self, out: Path, shard_dir: Path, plan: dict[int, tuple[int, int]],
                 frame_spec: FrameSpec, action_space: gym.Space, identity: dict[str, Any]) -> None:
        self.out = out
        self.shard_dir = shard_dir
        self.plan = plan
        self.identity = identity
        self.columns = _columns(frame_spec, action_space, identity["game_variables"])

    def write(self, done: dict[int, int]) -> None:
        """Write the index for the shards in `done` (shard -> steps) to a temp name, then rename."""
        shards = sorted(done)
        total = sum(done[k] for k in shards)
        tmp = self.out.with_name(self.out.name + ".tmp")
        with h5py.File(tmp, "w") as f:
            for name, (tail, dtype) in self.columns.items():
                layout = h5py.VirtualLayout(shape=(total, *tail), dtype=dtype)
                offset = 0
                for k in shards:
                    source = os.path.relpath(shard_path(self.shard_dir, k), self.out.parent)
                    layout[offset:offset + done[k]] = h5py.VirtualSource(
                        Path(source).as_posix(), name, shape=(done[k], *tail))
                    offset += done[k]
                f.create_virtual_dataset(name, layout)
            f.attrs.update(self.identity)
            f.attrs.update(
                num_episodes=sum(self.plan[k][1] for k in shards),
                num_steps=total,
                episodes_requested=sum(count for _, count in self.plan.values()),
                complete=len(shards) == len(self.plan),
                dreamenv_version=_package_version(),
            )
        os.replace(tmp, self.out)


def _columns(frame_spec: FrameSpec, action_space: gym.Space,
             game_variables: int = 0) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Per-step shape (after the step axis) and dtype of every stored dataset; game_variables (the values seen with
    step t's frame, before its action) only for envs that report them."""
    size = frame_spec.size
    columns = {
        "frames": ((size, size, 3), np.dtype(np.uint8)),
        "actions": _action_column(action_space),
        "rewards": ((), np.dtype(np.float32)),
        "terminated": ((), np.dtype(bool)),
        "truncated": ((), np.dtype(bool)),
        "episode_starts": ((), np.dtype(bool)),
    }
    if game_variables:
        columns["game_variables"] = ((game_variables,), np.dtype(np.float32))
    return columns


def _action_column(space: gym.Space) -> tuple[tuple[int, ...], np.dtype]:
    """Stored action shape and dtype: float32 for Box, int64 for Discrete."""
    if isinstance(space, gym.spaces.Discrete):
        return (), np.dtype(np.int64)
    return tuple(space.shape), np.dtype(np.float32)


def _package_version() -> str:
    """Installed dreamenv version, or a marker when running from a plain checkout."""
    try:
        return version("dreamenv")
    except PackageNotFoundError:
        return "0+unknown"


# ---------------------------------------------------------------- worker side


def collect_shard(task: ShardTask) -> ShardResult:
    """Worker: run the shard's episodes, write them to <shard>.tmp, then rename to the shard file."""
    env = _make_env(task.env_id, task.from_render)
    try:
        spec = frame_spec_for(env, task.from_render, task.crop)
        columns = _columns(spec, env.action_space, game_variable_count(env.observation_space))
        tmp = task.path + ".tmp"
        with h5py.File(tmp, "w") as f:
            writer = _ShardWriter(f, columns, compression_kwargs(task.compression))
            for i in range(task.first_episode, task.first_episode + task.num_episodes):
                writer.append(_run_episode(env, spec, task.policy, task.seed + i, columns))
            f.attrs.update(task.attrs)
            f.attrs.update(
                shard=task.shard,
                first_episode=task.first_episode,
                num_episodes=task.num_episodes,
                num_steps=writer.length,
                dreamenv_version=_package_version(),
                complete=True,
            )
            length = writer.length
        os.replace(tmp, task.path)
    finally:
        env.close()
    return ShardResult(task.shard, task.num_episodes, length)


class _ShardWriter:
    """Appends episodes to flat, chunked, resizable datasets."""

    def __init__(self, f: h5py.File, columns: dict[str, tuple[tuple[int, ...], np.dtype]],
                 frame_compression: dict[str, Any]) -> None:
        self.length = 0
        self.datasets = {}
        for name, (tail, dtype) in columns.items():
            chunk = FRAME_CHUNK if name == "frames" else ARRAY_CHUNK
            extra = frame_compression if name == "frames" else {}
            self.datasets[name] = f.create_dataset(
                name, shape=(0, *tail), maxshape=(None, *tail), dtype=dtype, chunks=(chunk, *tail), **extra)

    def append(self, episode: dict[str, np.ndarray]) -> None:
        """Append one episode's arrays (all of equal length)."""
        n = len(episode["frames"])
        for name, ds in self.datasets.items():
            ds.resize(self.length + n, axis=0)
            ds[self.length:] = episode[name]
        self.length += n


def _run_episode(env: gym.Env, spec: FrameSpec, policy: str | PolicyFactory, seed: int,
                 columns: dict[str, tuple[tuple[int, ...], np.dtype]]) -> dict[str, np.ndarray]:
    """One seeded episode until terminated or truncated; step t keeps the frame (and game variables) seen before
    action t."""
    act = _episode_policy(policy, env, seed)
    action_shape = columns["actions"][0]
    frames, actions, rewards, terminals, truncations, variables = [], [], [], [], [], []
    obs, _ = env.reset(seed=seed)
    terminated = truncated = False
    while not (terminated or truncated):
        frame = extract_frame(obs, env, spec)
        action = act(obs, frame)
        if "game_variables" in columns:
            variables.append(np.ravel(obs[GAME_VARIABLES_KEY]))
        obs, reward, terminated, truncated, _ = env.step(action)
        frames.append(frame)
        actions.append(np.reshape(action, action_shape))
        rewards.append(reward)
        terminals.append(terminated)
        truncations.append(truncated)
    starts = np.zeros(len(frames), dtype=bool)
    starts[0] = True
    values = {"frames": frames, "actions": actions, "rewards": rewards, "terminated": terminals,
              "truncated": truncations, "episode_starts": starts, "game_variables": variables}
    return {name: np.asarray(values[name], dtype=dtype) for name, (_, dtype) in columns.items()}


def _episode_policy(policy: str | PolicyFactory, env: gym.Env, seed: int) -> PolicyFn:
    """A fresh policy for one episode, seeded from the episode seed (the env's action space too, for factories)."""
    space = env.action_space
    space.seed(seed)
    if callable(policy):
        return policy(env)
    if policy == "random":
        return lambda obs, frame: space.sample()
    if policy == "brownian":
        return _brownian_policy(env.action_space, np.random.default_rng(seed))
    if policy == "hold":
        return _long_hold_policy(env.action_space, np.random.default_rng(seed))
    if policy == "drive":
        return _driving_policy(env.action_space, np.random.default_rng(seed))
    if policy == "road":
        return _road_following_policy(env.action_space, env.observation_space, np.random.default_rng(seed))
    raise ValueError(f"unknown policy {policy!r}")


def _check_car_actions(space: gym.Space, policy: str) -> None:
    """The CarRacing exploration policies need its (steer, gas, brake) Box."""
    driving = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
    if not isinstance(space, gym.spaces.Box) or space.shape != (3,) or not (
        np.allclose(space.low, driving.low) and np.allclose(space.high, driving.high)
    ):
        raise ValueError(f"the {policy} policy is for CarRacing's (steer, gas, brake) actions {driving}, got {space}; "
                         "use --policy brownian or random")


def _driving_policy(space: gym.Space, rng: np.random.Generator) -> PolicyFn:
    """CarRacing exploration that moves the car: steering a mean-reverting random walk, gas held, brief brakes.

    Uniform or brownian gas and brake cancel out (the car barely leaves the start), so random data
    would never show the track at speed. Gas and brake are redrawn every 5..20 steps.
    """
    _check_car_actions(space, "drive")
    steer, gas, brake, hold = 0.0, 1.0, 0.0, 0

    def step(obs: Any, frame: np.ndarray) -> np.ndarray:
        nonlocal steer, gas, brake, hold
        steer = float(np.clip(0.9 * steer + rng.normal(0.0, 0.3), -1.0, 1.0))
        if hold == 0:
            gas = float(rng.uniform(0.3, 1.0))
            brake = float(rng.uniform(0.2, 0.8)) if rng.random() < 0.1 else 0.0
            hold = int(rng.integers(5, 21))
        hold -= 1
        return np.array([steer, gas, brake], space.dtype)

    return step


ROAD_ROWS = slice(40, 56, 3)  # rows of CarRacing's 96 x 96 frame a few car lengths ahead of the car (which is in rows 66..77)
CAR_COLUMN = 47.5  # the car's centre column


def road_centre(frame: np.ndarray) -> float | None:
    """Mean column of the grey road pixels (channels within 12 of each other, 80..140) in the rows ahead of the car;
    None when no road is in sight."""
    rows = frame[ROAD_ROWS].astype(np.int16)
    grey = ((np.abs(rows[..., 0] - rows[..., 1]) < 12) & (np.abs(rows[..., 1] - rows[..., 2]) < 12)
            & (rows[..., 0] > 80) & (rows[..., 0] < 140))
    columns = np.nonzero(grey)[1]
    return float(columns.mean()) if len(columns) else None


def _road_following_policy(space: gym.Space, observation_space: gym.Space, rng: np.random.Generator) -> PolicyFn:
    """CarRacing exploration that follows the road: steer towards the grey road ahead, plus a random walk.

    Random and `drive` data seldom show a car taking corners at speed and collecting tiles, so a dream learnt from
    them cannot tell good driving from bad. Each episode draws its own steering gain (0.05..0.15 per pixel), noise
    (0.1..0.5) and gas range, so the data holds careful and sloppy laps, leaving the road and coming back.
    """
    _check_car_actions(space, "road")
    if not isinstance(observation_space, gym.spaces.Box) or observation_space.shape != (96, 96, 3):
        raise ValueError(f"the road policy reads CarRacing's 96 x 96 x 3 frames, got observations {observation_space}; "
                         "use --policy drive")
    gain, noise = rng.uniform(0.05, 0.15), rng.uniform(0.1, 0.5)
    top_gas = rng.uniform(0.2, 0.6)
    wander, gas, brake, hold = 0.0, top_gas, 0.0, 0

    def step(obs: Any, frame: np.ndarray) -> np.ndarray:
        nonlocal wander, gas, brake, hold
        centre = road_centre(obs)
        wander = 0.9 * wander + rng.normal(0.0, noise * 0.45)
        target = 0.0 if centre is None else (centre - CAR_COLUMN) * gain
        steer = float(np.clip(target + wander, -1.0, 1.0))
        if hold == 0:
            gas = float(rng.uniform(0.0, top_gas))
            brake = float(rng.uniform(0.1, 0.6)) if rng.random() < 0.1 else 0.0
            hold = int(rng.integers(5, 21))
        hold -= 1
        return np.array([steer, gas if abs(steer) < 0.3 else min(gas, 0.05), brake], space.dtype)

    return step


def _brownian_policy(space: gym.Space, rng: np.random.Generator) -> PolicyFn:
    """Correlated exploration: a clipped random walk (Box) or random actions held 1..10 steps (Discrete)."""
    if isinstance(space, gym.spaces.Box):
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        scale = np.where(np.isfinite(high - low), 0.1 * (high - low), 0.1)
        action = np.clip(rng.normal(0.0, scale), low, high)

        def box_step(obs: Any, frame: np.ndarray) -> np.ndarray:
            nonlocal action
            out = action.astype(space.dtype)
            action = np.clip(action + rng.normal(0.0, scale), low, high)
            return out

        return box_step
    if isinstance(space, gym.spaces.Discrete):
        held, left = 0, 0

        def discrete_step(obs: Any, frame: np.ndarray) -> int:
            nonlocal held, left
            if left == 0:
                held, left = int(space.start + rng.integers(space.n)), int(rng.integers(1, 11))
            left -= 1
            return held

        return discrete_step
    raise ValueError(f"the brownian policy needs a Box or Discrete action space, got {space}")


LONGEST_MEAN_HOLD = 200  # steps; the `hold` policy's episodes draw their mean hold from 1..this


def _long_hold_policy(space: gym.Space, rng: np.random.Generator) -> PolicyFn:
    """Random actions held for long stretches: each episode draws a mean hold of 1..200 steps (log-uniform).

    Brownian holds of 1..10 steps never show what standing still or holding one direction for long leads to, and
    the TakeCover dreams learnt from such data let a standing agent live far longer than the game does. Hold
    lengths are geometric around the episode's mean, so the data spans random play and one action held throughout.
    """
    if isinstance(space, gym.spaces.Discrete):
        def draw() -> Any:
            return int(space.start + rng.integers(space.n))
    elif isinstance(space, gym.spaces.Box):
        low, high = space.low.astype(np.float64), space.high.astype(np.float64)
        bounded = np.isfinite(low) & np.isfinite(high)

        def draw() -> Any:
            uniform = rng.uniform(np.where(bounded, low, 0.0), np.where(bounded, high, 0.0))
            return np.where(bounded, uniform, rng.normal(0.0, 1.0, space.shape)).astype(space.dtype)
    else:
        raise ValueError(f"the hold policy needs a Box or Discrete action space, got {space}")
    mean_hold = float(np.exp(rng.uniform(0.0, np.log(LONGEST_MEAN_HOLD))))
    held: Any = None
    left = 0

    def step(obs: Any, frame: np.ndarray) -> Any:
        nonlocal held, left
        if left == 0:
            held, left = draw(), int(rng.geometric(1.0 / mean_hold))
        left -= 1
        return held

    return step
