"""Stable-Baselines3 agents in the dream: PPO trained on the batched dream, saved as model.zip (SB3's format) beside
agent.json, and loading of any SB3 algorithm's zip. SB3 is imported only when used."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from gymnasium.error import DependencyNotInstalled
from tqdm.auto import tqdm

from dreamenv.agents.saved import check_agent_bundle, read_agent_info, write_agent_info
from dreamenv.config import config_from_table
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


@dataclass
class PPOConfig:
    """SB3 PPO (MlpPolicy) on n_envs batched dreams. Hyperparameters are SB3's defaults except n_steps: with
    many dreams, 256 steps each already make a large update."""

    timesteps: int = 1_000_000
    n_envs: int = 16
    temperature: float | None = None  # None: the bundle's default
    done_mode: str = "sample"  # how M's p(done) ends a dream, as DreamEnv
    done_threshold: float = 0.5
    n_steps: int = 256
    batch_size: int = 64
    learning_rate: float = 3e-4
    gamma: float = 0.99
    ent_coef: float = 0.0
    checkpoint_every: int = 100_000  # timesteps between saves of model.zip; a rerun resumes from the last one
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("timesteps", "n_envs", "n_steps", "batch_size", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PPOConfig":
        """A config from a recipe's [ppo] table; unknown keys are an error that lists the known ones."""
        return config_from_table(cls, data, "PPO")


def _save_agent(model: Any, out: Path, world_model: WorldModel, bundle: str, temperature: float, config: PPOConfig) -> None:
    """Write out/model.zip (through a temporary name) and out/agent.json."""
    model.save(out / "model.tmp.zip")
    (out / "model.tmp.zip").replace(out / MODEL_FILE)
    write_agent_info(out, "ppo", world_model, bundle,
                     {"temperature": temperature, "timesteps": int(model.num_timesteps), "config": asdict(config)})


def train_ppo(bundle: str | Path, out: str | Path, config: PPOConfig | None = None, progress: bool = True) -> Any:
    """Train SB3 PPO in the batched dream of `bundle`; saves out/model.zip + out/agent.json and resumes from them."""
    ppo = sb3_class("ppo")  # first: a clear error without Stable-Baselines3
    from stable_baselines3.common.vec_env import VecMonitor

    from dreamenv.envs.sb3 import sb3_vec_env

    config = config or PPOConfig()
    wm = load_world_model(bundle)
    temperature = wm.default_temperature if config.temperature is None else float(config.temperature)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    venv = VecMonitor(sb3_vec_env(bundle, config.n_envs, temperature=temperature, done_mode=config.done_mode,
                                  done_threshold=config.done_threshold))  # episode returns for SB3's logs and the bar
    if (out / MODEL_FILE).is_file():
        check_agent_bundle(read_agent_info(out), wm, out)
        model = ppo.load(out / MODEL_FILE, env=venv, device="cpu")
    else:
        model = ppo("MlpPolicy", venv, n_steps=config.n_steps, batch_size=config.batch_size, learning_rate=config.learning_rate,
                    gamma=config.gamma, ent_coef=config.ent_coef, seed=config.seed, device="cpu")
    source = str(resolve_bundle(bundle)) if Path(bundle).exists() else str(bundle)  # shipped names stay names
    with tqdm(total=config.timesteps, initial=min(model.num_timesteps, config.timesteps), unit="step",
              desc=f"PPO in the dream, tau={temperature:g}", disable=not progress) as bar:

        def show_progress(_locals: dict[str, Any], _globals: dict[str, Any]) -> bool:
            bar.update(min(model.num_timesteps, config.timesteps) - bar.n)
            if model.ep_info_buffer:  # the last 100 dream episodes
                bar.set_postfix(dream_return=f"{np.mean([e['r'] for e in model.ep_info_buffer]):.1f}", refresh=False)
            return True  # keep training

        while model.num_timesteps < config.timesteps:
            model.learn(min(config.checkpoint_every, config.timesteps - model.num_timesteps), callback=show_progress,
                        reset_num_timesteps=False)
            _save_agent(model, out, wm, source, temperature, config)
    return model
