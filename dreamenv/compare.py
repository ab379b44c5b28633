"""One scoring harness for any agent: virtual (dream) vs actual (real game) scores with paired seeds and bootstrap CIs.

Episode i uses seed `seed + i` in both worlds: dream i is `DreamEnv` reset with that seed (all dreams stepped as one
batch by DreamVectorEnv), real episode i is the game reset with it (spread over the evaluator's workers).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import io
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

import gymnasium as gym
import numpy as np
import torch
from gymnasium.error import DependencyNotInstalled
from tqdm.auto import tqdm

from dreamenv.envs.spaces import observation_space
from dreamenv.parallel import run_tasks
from dreamenv.registry import load_world_model, resolve_bundle, resolve_controller
from dreamenv.worldmodel import WorldModel, action_dim

CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0  # fixed: an interval is a pure function of the scores
POLICY_ALGOS = ("linear", "actor-critic", "a2c", "ddpg", "dqn", "ppo", "sac", "td3")  # what can have saved a policy


# --- policies -------------------------------------------------------------------------------------------------

def load_policy(policy: str | Path, algo: str | None = None, bundle: Any = None) -> Any:
    """A saved policy: a controller directory or shipped name ("linear"), a `dreamenv train-agent` directory or, with
    its algo, a shipped agent's name, or an SB3 .zip with the algorithm that saved it; checked against `bundle` when given."""
    from dreamenv.agents.controller import LinearController
    from dreamenv.agents.saved import AGENT_FILE, load_agent
    from dreamenv.agents.sb3 import SB3_ALGOS, load_sb3_zip

    if algo is not None and algo not in POLICY_ALGOS:
        raise ValueError(f"unknown algo {algo!r}: one of {', '.join(POLICY_ALGOS)} (linear: a controller; "
                         "the SB3 names: a .zip or train-agent directory; actor-critic: a train-agent directory)")
    path = Path(policy).expanduser()
    world_model = load_world_model(bundle) if bundle is not None else None
    shipped_agent = not path.exists() and path.suffix != ".zip" and algo not in (None, "linear")  # a name and an algo
    if (path / AGENT_FILE).is_file() or shipped_agent:
        return load_agent(policy, algo, world_model)
    if path.suffix == ".zip":
        if algo not in SB3_ALGOS:
            raise ValueError(f"{path}: say which Stable-Baselines3 algorithm saved it (algo='ppo', --algo ppo; one of {', '.join(SB3_ALGOS)})")
        if not path.is_file():
            raise FileNotFoundError(f"{path} does not exist")
        return load_sb3_zip(path, algo)
    if algo not in (None, "linear"):
        raise ValueError(f"{path} is not a `dreamenv train-agent` directory (it has no {AGENT_FILE}), so it holds no "
                         f"{algo} agent: for a controller drop --algo or pass --algo linear")
    controller = LinearController.load(resolve_controller(policy))
    if world_model is not None:
        controller.check_bundle(world_model)
    return controller


def is_sb3_model(policy: Any) -> bool:
    """True for a Stable-Baselines3 algorithm instance (without importing SB3: no SB3 loaded, no SB3 model)."""
    base = sys.modules.get("stable_baselines3.common.base_class")
    return base is not None and isinstance(policy, base.BaseAlgorithm)


def check_policy(policy: Any, world_model: WorldModel, obs_mode: str) -> None:
    """Raise a clear error unless `policy` can act in this bundle's envs (interface, spaces, bundle)."""
    from dreamenv.agents.controller import LinearController

    if not callable(getattr(policy, "predict", None)) and not callable(policy):
        raise TypeError(f"policy must have predict(obs, deterministic=True) (Stable-Baselines3 style) or be a callable "
                        f"obs -> action; got {type(policy).__name__}")
    if isinstance(policy, LinearController):
        policy.check_bundle(world_model)
        if obs_mode != policy.obs_mode:
            raise ValueError(f"this controller acts on obs_mode {policy.obs_mode!r}, not {obs_mode!r}: score it with "
                             f"obs_mode={policy.obs_mode!r} (or leave obs_mode unset)")
        return
    expected = {"observation_space": observation_space(world_model, obs_mode), "action_space": world_model.action_space}
    for name, space in expected.items():
        own = getattr(policy, name, None)
        if isinstance(own, gym.Space) and own != space:
            raise ValueError(f"the policy's {name} {own} differs from this bundle's {space} (obs_mode={obs_mode!r}): "
                             "it was trained on another world model or observation mode")


@contextlib.contextmanager
def sampling_seed(seed: int, deterministic: bool) -> Iterator[None]:
    """For a sampled policy (deterministic=False), torch's generator seeded with `seed` inside the block and the
    caller's state restored after it; nothing happens for a deterministic one."""
    if deterministic:
        yield
        return
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def batch_actions(policy: Any, obs: np.ndarray, deterministic: bool = True) -> np.ndarray:
    """Actions for a batch of observations: policy.predict(obs, deterministic=...)[0], else policy(o) for each o."""
    if callable(getattr(policy, "predict", None)):
        actions, _ = policy.predict(obs, deterministic=deterministic)
        return np.asarray(actions)
    return np.asarray([policy(o) for o in obs])


@dataclass(frozen=True)
class SavedPolicy:
    """A policy that workers load from disk (a controller or `train-agent` directory, an SB3 .zip)."""

    path: str
    algo: str | None

    def load(self) -> Any:
        return load_policy(self.path, self.algo)


@dataclass(frozen=True)
class SB3Zip:
    """An SB3 model as its own zip format, in memory, reloaded in the worker by class path."""

    class_path: str  # "module:QualName"
    data: bytes

    def load(self) -> Any:
        module, qualname = self.class_path.split(":")
        cls = functools.reduce(getattr, qualname.split("."), importlib.import_module(module))
        return cls.load(io.BytesIO(self.data), device="cpu")


@dataclass(frozen=True)
class PolicyObject:
    """The policy itself: used in place by the serial backend, pickled to process and Ray workers."""

    policy: Any

    def load(self) -> Any:
        return self.policy


def portable_policy(policy: Any, loaded: Any, algo: str | None, backend: str) -> SavedPolicy | SB3Zip | PolicyObject:
    """How `policy` reaches the real-env workers of `backend`, or a clear error when it cannot."""
    if backend == "serial":
        return PolicyObject(loaded)
    if isinstance(policy, (str, Path)):
        return SavedPolicy(str(policy), algo)
    if is_sb3_model(policy):
        buffer = io.BytesIO()
        policy.save(buffer)
        cls = type(policy)
        return SB3Zip(f"{cls.__module__}:{cls.__qualname__}", buffer.getvalue())
    try:
        pickle.dumps(policy)
    except Exception as err:
        raise ValueError(
            f"the {backend} backend sends the policy to worker processes, but {type(policy).__name__} cannot be pickled "
            f"({err}): pass an SB3 model, a LinearController, a saved policy's path, or a module-level function or "
            "picklable object; or use backend='serial'"
        ) from err
    return PolicyObject(policy)


def describe(policy: Any) -> str:
    """A short name of a policy for tables: its path, or its function or class name."""
    if isinstance(policy, (str, Path)):
        return str(policy)
    return getattr(policy, "__qualname__", None) or type(policy).__name__


# --- episodes -------------------------------------------------------------------------------------------------

@dataclass
class Episodes:
    """Per-episode returns and lengths (episode i played with seed + i), and the sum of the encoded actions
    over all steps (one-hot for Discrete, the action for Box)."""

    returns: np.ndarray
    lengths: np.ndarray
    action_sum: np.ndarray


def dream_episodes(
    policy: Any, bundle: str | Path, episodes: int, temperature: float, seed: int, obs_mode: str = "latent",
    done_mode: str = "sample", done_threshold: float = 0.5, progress: bool = False, deterministic: bool = True,
) -> Episodes:
    """Play `episodes` dreams as one batch until each ends once; dream i is DreamEnv reset with seed + i. A stochastic
    policy (deterministic=False) samples with torch's generator seeded by `seed`, so a rerun gives the same scores."""
    from dreamenv.envs.vector import DreamVectorEnv

    env = DreamVectorEnv(episodes, bundle, temperature=temperature, obs_mode=obs_mode, done_mode=done_mode,
                         done_threshold=done_threshold)
    wm = env.world_model
    returns, lengths = np.zeros(episodes), np.zeros(episodes, np.int64)
    action_sum = np.zeros(action_dim(wm.action_space))
    running = np.ones(episodes, bool)
    obs, _ = env.reset(seed=seed)
    with sampling_seed(seed, deterministic), tqdm(total=env.max_episode_steps, desc=f"dream tau={temperature:g}",
                                                   unit="step", leave=False, disable=not progress) as bar:
        while running.any():
            acting = batch_actions(policy, obs[running], deterministic)
            actions = np.repeat(acting[:1], episodes, axis=0)  # finished dreams get any valid action; it is ignored
            actions[running] = acting
            obs, rewards, terminated, truncated, _ = env.step(actions)  # checks the actions
            action_sum += wm.encode_actions(acting).sum(0).numpy()
            returns[running] += rewards[running]
            lengths[running] += 1
            running &= ~(terminated | truncated)
            bar.update(1)
    env.close()
    return Episodes(returns, lengths, action_sum)


@dataclass(frozen=True)
class RealTask:
    """One worker's share of the real episodes."""

    bundle: str
    policy: SavedPolicy | SB3Zip | PolicyObject
    seeds: tuple[int, ...]
    obs_mode: str
    deterministic: bool = True
    encoding: str = "mean"


def real_episodes(task: RealTask) -> list[tuple[int, float, int, np.ndarray]]:
    """Worker: play the policy in RealEnv once per seed; (seed, return, length, action sum) per episode. A stochastic
    policy samples with torch's generator seeded by the episode's seed, so each episode is reproducible alone."""
    from dreamenv.envs.real import RealEnv

    policy = task.policy.load()
    env = RealEnv(task.bundle, obs_mode=task.obs_mode, encoding=task.encoding)
    wm = env.world_model
    results = []
    try:
        for seed in task.seeds:
            obs, _ = env.reset(seed=seed)
            total, length, done = 0.0, 0, False
            action_sum = np.zeros(action_dim(wm.action_space))
            with sampling_seed(seed, task.deterministic):
                while not done and length < wm.max_episode_steps:
                    action = batch_actions(policy, obs[None], task.deterministic)[0]
                    obs, reward, terminated, truncated, _ = env.step(action)  # checks the action
                    action_sum += wm.encode_actions(action[None])[0].numpy()
                    total += reward
                    length += 1
                    done = terminated or truncated
            results.append((seed, total, length, action_sum))
    finally:
        env.close()
    return results


def actual_episodes(
    bundle: str | Path, policy: SavedPolicy | SB3Zip | PolicyObject, episodes: int, seed: int = 0, obs_mode: str = "latent",
    backend: str = "process", workers: int = 2, progress: bool = True, deterministic: bool = True,
    encoding: str = "mean",
) -> Episodes:
    """Play `episodes` real episodes (episode i with seed + i), spread over the evaluator's workers."""
    seeds = list(range(seed, seed + episodes))
    chunk = max(1, min(8, -(-episodes // (2 * workers))))
    tasks = [RealTask(str(resolve_bundle(bundle)), policy, tuple(seeds[i : i + chunk]), obs_mode, deterministic, encoding)
             for i in range(0, episodes, chunk)]
    by_seed: dict[int, tuple[float, int, np.ndarray]] = {}
    with tqdm(total=episodes, desc="real episodes", unit="ep", disable=not progress) as bar:
        for results in run_tasks(real_episodes, tasks, backend=backend, workers=workers):
            for s, total, length, action_sum in results:
                by_seed[s] = (total, length, action_sum)
            bar.update(len(results))
    returns, lengths, action_sums = zip(*(by_seed[s] for s in seeds))
    return Episodes(np.array(returns), np.array(lengths), np.sum(action_sums, axis=0))


# --- statistics -----------------------------------------------------------------------------------------------

def bootstrap_ci(samples: Iterable[float], resamples: int = BOOTSTRAP_RESAMPLES) -> list[float]:
    """Percentile bootstrap 95% interval of the mean, from a fixed generator (same scores, same interval)."""
    samples = np.asarray(list(samples), np.float64)
    if samples.size == 0:
        raise ValueError("bootstrap_ci needs at least one sample")
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    n = len(samples)
    chunk = max(1, (1 << 22) // n)  # resamples per block: at most ~4M indices in memory
    means = np.concatenate([samples[rng.integers(0, n, (min(chunk, resamples - start), n))].mean(1)
                            for start in range(0, resamples, chunk)])
    low, high = np.quantile(means, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
    return [float(low), float(high)]


def score_summary(episodes: Episodes) -> dict[str, Any]:
    """JSON-able statistics of one set of episodes: mean, std, min, max, 95% CI of the mean, and the raw data."""
    returns = episodes.returns
    return {"mean": float(np.mean(returns)), "std": float(np.std(returns)), "min": float(np.min(returns)),
            "max": float(np.max(returns)), "episodes": int(len(returns)), "ci95": bootstrap_ci(returns),
            "mean_length": float(np.mean(episodes.lengths)),
            "action_mean": (episodes.action_sum / max(1, int(episodes.lengths.sum()))).tolist(),
            "scores": returns.tolist(), "lengths": episodes.lengths.tolist()}


# --- the harness ----------------------------------------------------------------------------------------------

class Comparison(dict):
    """compare()'s result: a JSON-able dict (json.dump it as is) that renders itself as Markdown and as a PNG plot."""

    def markdown(self) -> str:
        """The Markdown table of markdown_table()."""
        return markdown_table(self)

    def plot(self, path: str | Path) -> Path:
        """Write the PNG of save_plot() to `path`."""
        return save_plot(self, path)


def compare(
    policy: Any,
    bundle: str | Path,
    temperatures: Iterable[float] | None = None,
    episodes: int = 100,
    seed: int = 0,
    backend: str = "process",
    workers: int = 2,
    *,
    algo: str | None = None,
    real: bool = True,
    obs_mode: str | None = None,
    done_mode: str = "sample",
    done_threshold: float = 0.5,
    progress: bool = True,
    deterministic: bool = True,
    encoding: str = "mean",
) -> Comparison:
    """Score any policy in the dream (at each temperature) and in the real game, episode i with seed + i in both.

    policy: anything with SB3-style predict(obs, deterministic=True), or a callable obs -> action, or the path of
    a saved policy (controller directory or shipped name, `dreamenv train-agent` directory, SB3 .zip with `algo`).
    temperatures: dream temperatures (default: the bundle's). The process and Ray backends need the policy in
    their workers: SB3 models travel as their zip, paths are loaded there, anything else must pickle.
    obs_mode: what the policy sees in both envs; None takes a controller's own ("latent" or "latent_cell"), else "latent".
    deterministic: passed to predict, as in SB3's evaluate_policy; False samples the policy's actions (seeded per
    episode, so the scores are reproducible). A callable is called as it is either way.
    encoding: how the real env turns frames into z, "mean" (V's mean) or "sample" (a draw from V's posterior, seeded
    per episode: what M learnt from; see RealEnv).
    """
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    wm = load_world_model(bundle)
    loaded = load_policy(policy, algo, wm) if isinstance(policy, (str, Path)) else policy
    obs_mode = obs_mode or getattr(loaded, "obs_mode", "latent")
    check_policy(loaded, wm, obs_mode)
    from dreamenv.envs.real import latent_filter

    latent_filter(wm, obs_mode=obs_mode, encoding=encoding)  # a clear error before any episode runs
    temperatures = [wm.default_temperature] if temperatures is None else [float(t) for t in temperatures]
    if not temperatures:
        raise ValueError("temperatures is empty: give at least one dream temperature (or None for the bundle's)")
    result = Comparison({
        "env_id": wm.env_id, "bundle": str(resolve_bundle(bundle)), "policy": describe(policy), "episodes": episodes,
        "seed": seed, "obs_mode": obs_mode, "deterministic": deterministic, "done_mode": done_mode,
        "done_threshold": done_threshold, "encoding": encoding, "virtual": {},
    })
    shipped = portable_policy(policy, loaded, algo, backend) if real else None  # fails before any episode runs
    for tau in temperatures:
        dreamed = dream_episodes(loaded, bundle, episodes, tau, seed, obs_mode, done_mode, done_threshold, progress,
                                 deterministic)
        result["virtual"][f"{tau:g}"] = score_summary(dreamed)
    if shipped is not None:
        actual = actual_episodes(bundle, shipped, episodes, seed, obs_mode, backend, workers, progress, deterministic,
                                 encoding)
        result["actual"] = score_summary(actual)
        result["gap"] = {}
        for tau, virtual in result["virtual"].items():
            difference = np.asarray(virtual["scores"]) - actual.returns  # paired by seed
            result["gap"][tau] = {"mean": float(difference.mean()), "ci95": bootstrap_ci(difference)}
    return result


# --- reports --------------------------------------------------------------------------------------------------

def _interval(ci: list[float]) -> str:
    return f"[{ci[0]:.1f}, {ci[1]:.1f}]"


def markdown_table(result: dict[str, Any]) -> str:
    """Markdown table of a compare() (or evaluate()) result: one row per temperature, mean +- std and 95% CIs, and
    the mean action in each (a policy that acts otherwise in the game than in its dream meets states the dream never
    showed it)."""
    actual = result.get("actual")
    actual_text = f"{actual['mean']:.1f} +- {actual['std']:.1f}" if actual else "n/a"
    actual_ci = _interval(actual["ci95"]) if actual else "n/a"
    seed = result.get("seed")
    seed_text = f", seeds {seed}..{seed + result['episodes'] - 1} in both" if seed is not None else ""
    sampled_text = ", actions sampled (deterministic=False)" if result.get("deterministic") is False else ""
    lines = [f"{result['env_id']}, policy {result.get('policy', result.get('controller', '?'))}: "
             f"{result['episodes']} episodes each{seed_text}{sampled_text}; mean +- std, and bootstrap 95% CI of the mean",
             "",
             "| tau | virtual score | actual score | virtual 95% CI | actual 95% CI | virtual - actual (paired), 95% CI "
             "| mean action, virtual / actual |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for tau, v in result["virtual"].items():
        gap = result.get("gap", {}).get(tau)
        gap_text = f"{gap['mean']:.1f} {_interval(gap['ci95'])}" if gap else "n/a"
        actions = f"{_action_text(v)} / {_action_text(actual)}"
        lines.append(f"| {tau} | {v['mean']:.1f} +- {v['std']:.1f} | {actual_text} | {_interval(v['ci95'])} | {actual_ci} | {gap_text} "
                     f"| {actions} |")
    return "\n".join(lines)


def _action_text(summary: dict[str, Any] | None) -> str:
    """A score summary's mean action (M's encoding: the values of a Box, the frequencies of a Discrete), or n/a."""
    if not summary or "action_mean" not in summary:
        return "n/a"
    return "(" + ", ".join(f"{a:.2f}" for a in summary["action_mean"]) + ")"


def new_figure(path: str | Path, **figure_kwargs: Any) -> tuple[Any, Path]:
    """A matplotlib Figure (no pyplot state, so no GUI backend) and `path` with its folder made; without
    matplotlib, a clear error with the fix."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise DependencyNotInstalled('plotting needs matplotlib: pip install "dreamenv[plot]"') from err
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return Figure(layout="constrained", **figure_kwargs), path


def save_plot(result: dict[str, Any], path: str | Path) -> Path:
    """PNG of the virtual score (mean, 95% CI) against temperature, the actual score as a line and band."""
    figure, path = new_figure(path, figsize=(6.4, 4.2))
    rows = sorted((float(tau), v) for tau, v in result["virtual"].items())
    taus = np.array([tau for tau, _ in rows])
    means = np.array([v["mean"] for _, v in rows])
    cis = np.array([v["ci95"] for _, v in rows])
    axes = figure.add_subplot()
    axes.errorbar(taus, means, yerr=[means - cis[:, 0], cis[:, 1] - means], fmt="o-", capsize=4, label="virtual (dream)")
    actual = result.get("actual")
    if actual:
        axes.axhline(actual["mean"], color="C1", label="actual (real game)")
        axes.axhspan(*actual["ci95"], color="C1", alpha=0.2, label="actual 95% CI")
    axes.set_xlabel("dream temperature tau")
    axes.set_ylabel(f"mean return, {result['episodes']} episodes (95% CI)")
    axes.set_title(f"{result['env_id']}: {result.get('policy', result.get('controller', ''))}", fontsize=9)
    axes.legend()
    figure.savefig(path, format="png", dpi=120)
    return path
