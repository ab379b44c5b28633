"""Imagination that torch can differentiate: the dream stepped with autograd, so an actor for Box actions can follow
the gradient of its lambda-returns back through the world model (DreamerV1's to V3's continuous-control gradient)
instead of REINFORCE's.

The step is the dream core's math written with the model's own modules (no fused buffers, which autograd cannot use):
from the same state, actions, temperature and noise it gives the same next state and reward. In an MDN-RNN the
mixture component of each latent is drawn from the noise and held fixed; the gradient flows through the chosen
Gaussian's mean and scale (the reparameterised sample), through the LSTM and through the reward and done heads. In an
RSSM each categorical latent's class is drawn from the noise and the gradient passes it straight through (one-hot +
p - sg(p), as DreamerV3 does), and through the GRU and the heads. The model's weights stay frozen.
"""
from __future__ import annotations

from typing import Callable

import gymnasium as gym
import numpy as np
import torch

from torch.nn import functional as F

from dreamenv.envs.dream import DreamState
from dreamenv.envs.noise import Noise
from dreamenv.envs.rssm_core import RSSMState
from dreamenv.models.mdnrnn import sample_mdn
from dreamenv.models.rssm import sample_class
from dreamenv.worldmodel import WorldModel


def check_dynamics_gradient(world_model: WorldModel) -> None:
    """ValueError naming the fix when a bundle's dream cannot carry the actor's gradient (Discrete actions)."""
    if not isinstance(world_model.action_space, gym.spaces.Box):
        raise ValueError(f"actor_gradient 'dynamics' needs Box actions to differentiate; {world_model.action_space} "
                         "is learnt with actor_gradient 'reinforce'")


def unit_to_box(actions: torch.Tensor, space: gym.spaces.Box) -> torch.Tensor:
    """Actions in [-1, 1] units (clipped) mapped linearly onto the Box's [low, high], differentiably (ActionHead.to_env
    without leaving torch)."""
    low = torch.as_tensor(space.low, dtype=torch.float32).reshape(-1)
    high = torch.as_tensor(space.high, dtype=torch.float32).reshape(-1)
    return low + (actions.clamp(-1.0, 1.0) + 1.0) / 2.0 * (high - low)


def differentiable_step(world_model: WorldModel, state: DreamState | RSSMState, actions: torch.Tensor,
                        temperature: float | torch.Tensor, noise: Noise) -> tuple[DreamState | RSSMState, torch.Tensor, torch.Tensor]:
    """The dream core's step with autograd: state and encoded actions -> next state, reward, p(done), all tensors."""
    if world_model.rssm is not None:
        model = world_model.rssm
        deter = model.recur(state.deter, state.stoch, actions)
        log_probs = model.prior(deter)
        classes = sample_class(log_probs.detach(), temperature, torch.from_numpy(noise.uniform))
        probs = log_probs.exp()
        stoch = (F.one_hot(classes, probs.shape[-1]).to(probs.dtype) + probs - probs.detach()).flatten(1)
        feat = model.feature(deter, stoch)
        return RSSMState(deter, stoch), model.reward(feat), torch.sigmoid(-model.continue_logit(feat))
    m = world_model.mdnrnn
    h, c = m.step(state.z, actions, state.h, state.c)
    out = m.heads(h)
    z = sample_mdn(out, temperature, torch.from_numpy(noise.uniform), torch.from_numpy(noise.normal))
    return DreamState(z, h, c), out.reward, torch.sigmoid(out.done_logit)


def latent_observation(state: DreamState | RSSMState, obs_mode: str) -> torch.Tensor:
    """The core's latent_obs as a tensor in the graph: [z, h], or [z, c, h] for "latent_cell"; an RSSM's [h, z]."""
    if isinstance(state, RSSMState):
        return torch.cat([state.deter, state.stoch], dim=-1)
    return torch.cat([state.z, state.c, state.h] if obs_mode == "latent_cell" else [state.z, state.h], dim=-1)


def imagine_differentiably(world_model: WorldModel, state: DreamState | RSSMState, elapsed: np.ndarray, horizon: int,
                           act: Callable[[torch.Tensor], torch.Tensor], temperature: float | torch.Tensor,
                           noises: list[Noise], obs_mode: str) -> tuple[dict[str, torch.Tensor], DreamState]:
    """`horizon` steps of the dream from `state` with actions act(obs) in [-1, 1] units, kept in the graph.

    Returns (horizon, batch) tensors obs, actions, rewards, continues (1 - p(done)), successors and `ended` (the
    step where a dream reaches the env's step limit: its return bootstraps there, and `valid` is False after it), and
    the last state. Nothing is sampled for termination: the model's p(done) discounts the returns instead, as
    DreamerV2's continue head does.
    """
    steps: dict[str, list[torch.Tensor]] = {k: [] for k in ("obs", "actions", "rewards", "continues", "successors")}
    space = world_model.action_space
    obs = latent_observation(state, obs_mode)
    for noise in noises[:horizon]:
        actions = act(obs)
        box_actions = unit_to_box(actions, space).reshape(len(actions), -1)  # the model reads a Box action as it is
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
