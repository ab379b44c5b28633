"""dreamenv: learned world models as Gymnasium environments. Importing it registers the Dream-*/Real-* ids."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from dreamenv.compare import compare
from dreamenv.registry import load_world_model, register_bundle, register_shipped
from dreamenv.worldmodel import BundleError, WorldModel

__all__ = [
    "BundleError", "WorldModel", "compare", "load_agent", "load_controller", "load_world_model", "make_dream", "make_dream_vec", "make_real", "sb3_vec_env", "register_bundle",
]


def make_dream(bundle: str | Path, temperature: float | None = None, **kwargs: Any):
    """A DreamEnv of a bundle directory or shipped name, wrapped in the env's TimeLimit like gym.make."""
    from gymnasium.wrappers import TimeLimit

    from dreamenv.envs.dream import DreamEnv

    env = DreamEnv(bundle, temperature=temperature, **kwargs)
    return TimeLimit(env, env.world_model.max_episode_steps)


def make_real(bundle: str | Path, **kwargs: Any):
    """A RealEnv: the bundle's real game with the dream's observation and action spaces."""
    from dreamenv.envs.real import RealEnv

    return RealEnv(bundle, **kwargs)


def make_dream_vec(bundle: str | Path, num_envs: int, temperature: float | None = None, **kwargs: Any):
    """A DreamVectorEnv: num_envs dreams stepped as one batch (Gymnasium VectorEnv API)."""
    from dreamenv.envs.vector import DreamVectorEnv

    return DreamVectorEnv(num_envs, bundle, temperature=temperature, **kwargs)


def sb3_vec_env(env: str | Path, n_envs: int = 8, **kwargs: Any):
    """A Stable-Baselines3 VecEnv of n_envs batched dreams (a Dream-*-v0 id, a bundle directory or a shipped name)."""
    from dreamenv.envs.sb3 import sb3_vec_env as _make

    return _make(env, n_envs, **kwargs)


def load_controller(controller: str | Path, bundle: Any = None):
    """A trained controller (directory or shipped name); predict(obs, deterministic=True) -> (action, None)."""
    from dreamenv.agents.controller import load_controller as _load

    return _load(controller, bundle)


def load_agent(agent: str | Path, bundle: Any = None):
    """A trained agent (a `dreamenv train-agent` directory or a shipped name such as 'VizdoomTakeCover', whose
    actor-critic learned in the shipped dream); predict(obs, deterministic=True) -> (action, None)."""
    from dreamenv.agents.saved import load_agent as _load

    return _load(agent, world_model=load_world_model(bundle) if bundle is not None else None)


register_shipped()
