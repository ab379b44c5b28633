"""Stable-Baselines3 agents in the dream: PPO and SAC trained on the batched dream by one loop, saved as model.zip
(SB3's format) beside agent.json, and loading of any SB3 algorithm's zip. SB3 is imported only when used."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Self

import gymnasium as gym
import numpy as np
from gymnasium.error import DependencyNotInstalled
from tqdm.auto import tqdm

from dreamenv.agents.saved import check_agent_bundle, read_agent_info, write_agent_info
from dreamenv.agents.starts import StartStates, real_starts
from dreamenv.config import config_from_table
from dreamenv.envs.dream import dream_core
from dreamenv.registry import load_world_model, resolve_bundle
from dreamenv.worldmodel import WorldModel

MODEL_FILE = "model.zip"
SB3_ALGOS = {"a2c": "A2C", "ddpg": "DDPG", "dqn": "DQN", "ppo": "PPO", "sac": "SAC", "td3": "TD3"}


def sb3_class(algo: str) -> type:
    """The Stable-Baselines3 class of a lower-case algorithm name ('ppo' -> stable_baselines3.PPO)."""
    if algo not in SB3_ALGOS:
        raise ValueError(f"unknown Stable-Baselines3 algo {algo!r}: one of {', '.join(SB3_ALGOS)}")
    try:
        import stable_baselines3
    except ImportError as err:
        raise DependencyNotInstalled('Stable-Baselines3 agents need stable-baselines3: pip install "dreamenv[sb3]"') from err
    return getattr(stable_baselines3, SB3_ALGOS[algo])


def load_sb3_zip(path: str | Path, algo: str) -> Any:
    """An SB3 model saved in SB3's zip format by algorithm `algo`, loaded on the CPU."""
    return sb3_class(algo).load(path, device="cpu")


def _require_at_least(config: Any, minimum: int, names: tuple[str, ...]) -> None:
    """Raise ValueError for the first of `names` below `minimum`: a bad setting fails before any training."""
    for name in names:
        if getattr(config, name) < minimum:
            raise ValueError(f"{name} must be >= {minimum}, got {getattr(config, name)}")


@dataclass
class SB3DreamConfig:
    """What every SB3 algorithm here shares: the budget, the dreams it trains on, checkpoints and the seed. A
    subclass's own fields are SB3 constructor keywords of the same names (see sb3_kwargs)."""

    algo: ClassVar[str]  # the SB3_ALGOS name, agent.json's "algo" and (upper-cased) the recipe table's name in errors
    timesteps: int = 1_000_000
    n_envs: int = 16
    temperature: float | None = None  # None: the bundle's default
    done_mode: str = "sample"  # how M's p(done) ends a dream: "sample", "threshold" or "expected" (DreamVectorEnv)
    done_threshold: float = 0.5
    checkpoint_every: int = 100_000  # timesteps between saves of model.zip; a rerun resumes from the last one
    start_data: list[str] | None = None  # rollout stores whose real episodes' states the dreams start from (None: first frames)
    real_start_episodes: int = 64  # real episodes of start_data followed to build that start bank
    max_steps: int | None = None  # dream steps before an episode is truncated (None: the env's limit); short branches from real starts
    seed: int = 0

    def __post_init__(self) -> None:
        _require_at_least(self, 1, ("timesteps", "n_envs", "checkpoint_every", "real_start_episodes"))
        if self.max_steps is not None:
            _require_at_least(self, 1, ("max_steps",))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        """A config from a recipe's table ([ppo], [sac]); unknown keys are an error that lists the known ones."""
        return config_from_table(cls, data, cls.algo.upper())

    def sb3_kwargs(self) -> dict[str, Any]:
        """The SB3 constructor's keywords: the seed and the subclass's own fields (the shared ones are dreamenv's)."""
        shared = {f.name for f in fields(SB3DreamConfig)} - {"seed"}
        return {name: value for name, value in asdict(self).items() if name not in shared}


@dataclass
class PPOConfig(SB3DreamConfig):
    """SB3 PPO (MlpPolicy) on n_envs batched dreams. Hyperparameters are SB3's defaults except n_steps: with
    many dreams, 256 steps each already make a large update."""

    algo: ClassVar[str] = "ppo"
    n_steps: int = 256
    batch_size: int = 64
    learning_rate: float = 3e-4
    gamma: float = 0.99
    ent_coef: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_at_least(self, 1, ("n_steps", "batch_size"))


@dataclass
class SACConfig(SB3DreamConfig):
    """SB3 SAC (MlpPolicy) on n_envs batched dreams, for Box actions (CarRacing's steer, gas, brake).
    Hyperparameters are SB3's defaults except n_envs (a few dreams: SAC takes gradient_steps per step of all of
    them, so more dreams mean fewer updates per transition) and buffer_size: each transition keeps obs and next
    obs as float32, 8 bytes per observation number, so SB3's 1,000,000 would take ~2.3 GB for CarRacing's
    288-number observation; 200,000 bounds that to ~0.5 GB."""

    algo: ClassVar[str] = "sac"
    n_envs: int = 4
    learning_rate: float = 3e-4
    buffer_size: int = 200_000
    batch_size: int = 256
    learning_starts: int = 100  # random-action steps before training starts, and again after every resume
    gamma: float = 0.99
    tau: float = 0.005
    train_freq: int = 1  # steps of all n_envs dreams between trainings
    gradient_steps: int = 1  # per training; -1: one per transition collected (n_envs per step)
    ent_coef: str | float = "auto"  # "auto" (learned, SB3's default), "auto_0.1" (learned from 0.1) or a fixed value

    def __post_init__(self) -> None:
        super().__post_init__()
        _require_at_least(self, 1, ("buffer_size", "batch_size", "train_freq"))
        _require_at_least(self, 0, ("learning_starts",))
        if self.gradient_steps < 1 and self.gradient_steps != -1:
            raise ValueError(f"gradient_steps must be >= 1, or -1 for one per transition, got {self.gradient_steps}")


def _check_actions(config: SB3DreamConfig, world_model: WorldModel, bundle: str | Path) -> None:
    """Raise ValueError when the algorithm cannot act in the bundle's action space (SAC: Box only), with the fix."""
    if isinstance(config, SACConfig) and not isinstance(world_model.action_space, gym.spaces.Box):
        raise ValueError(f"SAC needs Box (continuous) actions, but {bundle} ({world_model.env_id}) has "
                         f"{world_model.action_space}: train it with --algo ppo, actor-critic or cmaes")


def _resume(algo: type, out: Path, venv: Any, config: SB3DreamConfig) -> Any:
    """The model in out/model.zip, set to train on. SB3's zip holds no replay buffer (SB3 keeps it apart, in a
    pickle, which dreamenv never reads), so SAC starts again from an empty one and refills it with
    learning_starts random-action steps before it trains."""
    model = algo.load(out / MODEL_FILE, env=venv, device="cpu")
    if isinstance(config, SACConfig):
        model.learning_starts = model.num_timesteps + config.learning_starts
    return model


def _start_states(world_model: WorldModel, config: SB3DreamConfig, progress: bool) -> StartStates:
    """The real-start bank of config.start_data, or without it the bundle's first frames."""
    if not config.start_data:
        return StartStates(dream_core(world_model), None)
    return real_starts(world_model, config.start_data, config.real_start_episodes, config.seed, progress)


def _save_agent(model: Any, out: Path, world_model: WorldModel, bundle: str, temperature: float, config: SB3DreamConfig,
                starts: StartStates) -> None:
    """Write out/model.zip (through a temporary name) and out/agent.json (with where the dreams started)."""
    model.save(out / "model.tmp.zip")
    (out / "model.tmp.zip").replace(out / MODEL_FILE)
    write_agent_info(out, config.algo, world_model, bundle,
                     {"temperature": temperature, "timesteps": int(model.num_timesteps), **starts.info(), "config": asdict(config)})


def train_sb3(bundle: str | Path, out: str | Path, config: SB3DreamConfig, progress: bool = True) -> Any:
    """Train the SB3 algorithm of `config` (PPOConfig, SACConfig) in the batched dream of `bundle`; saves
    out/model.zip + out/agent.json every checkpoint_every timesteps and resumes from them."""
    algo = sb3_class(config.algo)  # first: a clear error without Stable-Baselines3
    from stable_baselines3.common.vec_env import VecMonitor

    from dreamenv.envs.sb3 import sb3_vec_env

    wm = load_world_model(bundle)
    _check_actions(config, wm, bundle)
    temperature = wm.default_temperature if config.temperature is None else float(config.temperature)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    starts = _start_states(wm, config, progress)
    venv = VecMonitor(sb3_vec_env(bundle, config.n_envs, temperature=temperature, done_mode=config.done_mode,
                                  done_threshold=config.done_threshold, max_episode_steps=config.max_steps,
                                  starts=starts))  # episode returns for SB3's logs and the bar
    if (out / MODEL_FILE).is_file():
        check_agent_bundle(read_agent_info(out), wm, out)
        model = _resume(algo, out, venv, config)
    else:
        model = algo("MlpPolicy", venv, device="cpu", **config.sb3_kwargs())
    source = str(resolve_bundle(bundle)) if Path(bundle).exists() else str(bundle)  # shipped names stay names
    with tqdm(total=config.timesteps, initial=min(model.num_timesteps, config.timesteps), unit="step",
              desc=f"{config.algo.upper()} in the dream, tau={temperature:g}", disable=not progress) as bar:

        def show_progress(_locals: dict[str, Any], _globals: dict[str, Any]) -> bool:
            bar.update(min(model.num_timesteps, config.timesteps) - bar.n)
            if model.ep_info_buffer:  # the last 100 dream episodes
                bar.set_postfix(dream_return=f"{np.mean([e['r'] for e in model.ep_info_buffer]):.1f}", refresh=False)
            return True  # keep training

        while model.num_timesteps < config.timesteps:
            model.learn(min(config.checkpoint_every, config.timesteps - model.num_timesteps), callback=show_progress,
                        reset_num_timesteps=False)
            _save_agent(model, out, wm, source, temperature, config, starts)
    return model


def train_ppo(bundle: str | Path, out: str | Path, config: PPOConfig | None = None, progress: bool = True) -> Any:
    """Train SB3 PPO in the batched dream of `bundle` (train_sb3 with PPOConfig's defaults when no config is given)."""
    return train_sb3(bundle, out, config or PPOConfig(), progress)


def train_sac(bundle: str | Path, out: str | Path, config: SACConfig | None = None, progress: bool = True) -> Any:
    """Train SB3 SAC in the batched dream of a Box-action bundle (train_sb3 with SACConfig's defaults when no config
    is given). A resume starts from an empty replay buffer: see _resume."""
    return train_sb3(bundle, out, config or SACConfig(), progress)
