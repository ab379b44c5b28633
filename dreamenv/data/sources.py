"""The real environments behind dreamenv: make any Gymnasium id, with the paper's episode limits."""
from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
from gymnasium.error import DependencyNotInstalled

# Episode limits of the World Models experiments that differ from the env's own.
EPISODE_LIMITS: dict[str, int] = {"VizdoomTakeCover-v1": 2100}


def _ensure_registered(env_id: str) -> None:
    """Import the package that registers `env_id`, or say which extra installs it."""
    if env_id in gym.registry:
        if "CarRacing" in env_id or "LunarLander" in env_id or "BipedalWalker" in env_id:
            try:
                import Box2D  # noqa: F401
            except ImportError as err:
                raise DependencyNotInstalled(
                    f"{env_id} needs Box2D: pip install 'dreamenv[box2d]'"
                ) from err
        return
    if env_id.startswith("Vizdoom"):
        try:
            import vizdoom.gymnasium_wrapper  # noqa: F401  (registers the Vizdoom* ids)
        except ImportError as err:
            raise DependencyNotInstalled(
                f"{env_id} needs ViZDoom: pip install 'dreamenv[vizdoom]'"
            ) from err


def make_source_env(env_id: str, render_mode: str | None = None, **kwargs: Any) -> gym.Env:
    """gym.make(env_id) with the optional dependency checked and the paper's episode limit."""
    _ensure_registered(env_id)
    if env_id not in gym.registry:
        raise gym.error.NameNotFound(f"no Gymnasium env registered as {env_id!r}")
    limit = EPISODE_LIMITS.get(env_id)
    if limit is not None:
        kwargs.setdefault("max_episode_steps", limit)
    if env_id.startswith("Vizdoom"):
        # ViZDoom makes _vizdoom/ in the working directory when it starts; made here first, so that workers starting
        # together in a fresh directory do not race to create it (one such start failed with "File exists").
        os.makedirs("_vizdoom", exist_ok=True)
    return gym.make(env_id, render_mode=render_mode, **kwargs)
