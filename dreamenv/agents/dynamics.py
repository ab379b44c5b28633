"""Imagination that torch can differentiate: the MDN-RNN dream stepped with autograd, so an actor for Box actions can
follow the gradient of its lambda-returns back through M (DreamerV1's and DreamerV2's continuous-control gradient)
instead of REINFORCE's.

The step is DreamCore.step's math written with M's own modules (no fused buffers, which autograd cannot use): from the
same state, actions, temperature and noise it gives the same next state and reward. The mixture component of each
latent is drawn from the noise and held fixed; the gradient flows through the chosen Gaussian's mean and scale (the
reparameterised sample), through the LSTM and through the reward and done heads. M's weights stay frozen.
"""
from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from dreamenv.envs.dream import DreamState
from dreamenv.envs.noise import Noise
from dreamenv.models.mdnrnn import sample_mdn
from dreamenv.worldmodel import WorldModel


def check_dynamics_gradient(world_model: WorldModel) -> None:
    """ValueError naming the fix when a bundle's dream cannot carry the actor's gradient (RSSM, Discrete actions)."""
    if world_model.mdnrnn is None:
        raise ValueError("actor_gradient 'dynamics' steps an MDN-RNN with autograd; this bundle is an RSSM: "
                         "use actor_gradient 'reinforce'")
    if not isinstance(world_model.action_space, gym.spaces.Box):
        raise ValueError(f"actor_gradient 'dynamics' needs Box actions to differentiate; {world_model.action_space} "
                         "is learnt with actor_gradient 'reinforce'")


def unit_to_box(actions: torch.Tensor, space: gym.spaces.Box) -> torch.Tensor:
    """Actions in [-1, 1] units (clipped) mapped linearly onto the Box's [low, high], differentiably (ActionHead.to_env
    without leaving torch)."""
    low = torch.as_tensor(space.low, dtype=torch.float32).reshape(-1)
    high = torch.as_tensor(space.high, dtype=torch.float32).reshape(-1)
    return low + (actions.clamp(-1.0, 1.0) + 1.0) / 2.0 * (high - low)


def differentiable_step(world_model: WorldModel, state: DreamState, actions: torch.Tensor,
                        temperature: float | torch.Tensor, noise: Noise) -> tuple[DreamState, torch.Tensor, torch.Tensor]:
    """DreamCore.step with autograd: (z, h, c) and M's encoded actions -> next state, reward, p(done), all tensors."""
    m = world_model.mdnrnn
    h, c = m.step(state.z, actions, state.h, state.c)
    out = m.heads(h)
    z = sample_mdn(out, temperature, torch.from_numpy(noise.uniform), torch.from_numpy(noise.normal))
    return DreamState(z, h, c), out.reward, torch.sigmoid(out.done_logit)


def latent_observation(state: DreamState, obs_mode: str) -> torch.Tensor:
    """DreamCore.latent_obs as a tensor in the graph: [z, h], or [z, c, h] for "latent_cell"."""
    return torch.cat([state.z, state.c, state.h] if obs_mode == "latent_cell" else [state.z, state.h], dim=-1)


def imagine_differentiably(world_model: WorldModel, state: DreamState, elapsed: np.ndarray, horizon: int,
                           act: Callable[[torch.Tensor], torch.Tensor], temperature: float | torch.Tensor,
                           noises: list[Noise], obs_mode: str) -> tuple[dict[str, torch.Tensor], DreamState]:
    """`horizon` steps of the dream from `state` with actions act(obs) in [-1, 1] units, kept in the graph.

    Returns (horizon, batch) tensors obs, actions, rewards, continues (1 - p(done)), successors and `ended` (the
    step where a dream reaches the env's step limit: its return bootstraps there, and `valid` is False after it), and
    the last state. Nothing is sampled for termination: M's p(done) discounts the returns instead, as DreamerV2's
    continue head does.
    """
    steps: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "actions", "rewards", "continues", "successors")}
    space = world_model.action_space
    obs = latent_observation(state, obs_mode)
    for noise in noises[:horizon]:
        actions = act(obs)
        box_actions = unit_to_box(actions, space).reshape(len(actions), -1)  # M reads a Box action as it is
        state, rewards, done_probability = differentiable_step(world_model, state, box_actions, temperature, noise)
        successors = latent_observation(state, obs_mode)
        for key, value in zip(steps, (obs, actions, rewards, 1.0 - done_probability, successors)):
            steps[key].append(value)
        obs = successors
    batch = {key: torch.stack(values) for key, values in steps.items()}
    step_index = torch.as_tensor(elapsed)[None] + torch.arange(1, horizon + 1)[:, None]  # episode step after each step
    limit = world_model.max_episode_steps
    batch["ended"] = step_index == limit
    batch["valid"] = step_index <= limit
    return batch, state
