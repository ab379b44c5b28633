"""RealEnv: the real game seen through the bundle's world model (V + M, or the RSSM's posterior filter), so its
observations match the dream's."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import EzPickle

from dreamenv.data.preprocess import extract_frame
from dreamenv.data.sources import make_source_env
from dreamenv.envs.dream import DreamState
from dreamenv.envs.rssm_core import RSSMState
from dreamenv.envs.spaces import check_action, latent_dim, observation_space
from dreamenv.models.rssm import mode_one_hot
from dreamenv.models.vae import frames_to_tensor
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel


ENCODINGS = ("mean", "sample")  # how a real frame becomes z: V's mean, or a draw from V's posterior


def check_encoding(encoding: str) -> str:
    """The encoding, or a clear error naming the choices."""
    if encoding not in ENCODINGS:
        raise ValueError(f"encoding must be one of {ENCODINGS} (V's mean latent, or a draw from V's posterior), "
                         f"got {encoding!r}")
    return encoding


class MDNFilter:
    """Follows n real episodes with V + M: z_t = V's mean of frame t, h_{t+1} = M(z_t, a_t, h_t), h_0 = 0.
    With `cell`, observations are concat(z_t, c_t, h_t) (obs_mode "latent_cell").

    With encoding "sample", z_t is a draw from V's posterior N(mu, sigma^2) instead of its mean, as the original
    World Models code encodes real frames and as M saw its inputs in training; the noise comes from `rng`.
    """

    def __init__(self, world_model: WorldModel, n: int = 1, cell: bool = False, encoding: str = "mean",
                 rng: np.random.Generator | None = None) -> None:
        self.wm = world_model
        self.n = n
        self.cell = cell
        self.encoding = check_encoding(encoding)
        self.rng = rng if rng is not None else np.random.default_rng()
        self.reset()

    def reset(self) -> None:
        """New episodes: h_0 = c_0 = 0."""
        self.h = torch.zeros(self.n, self.wm.hidden_size)
        self.c = torch.zeros_like(self.h)
        self.z: torch.Tensor | None = None

    def observe(self, frames: np.ndarray) -> np.ndarray:
        """Take in frames (n, 64, 64, 3) uint8; returns the latent observations concat(z_t, h_t), (n, obs_dim)."""
        if self.encoding == "sample":
            mu, logvar = self.wm.encode_posterior(frames)
            noise = torch.from_numpy(self.rng.standard_normal(mu.shape, dtype=np.float32))
            self.z = mu + noise * torch.exp(0.5 * logvar)
        else:
            self.z = self.wm.encode_frames(frames)
        return torch.cat([self.z, self.c, self.h] if self.cell else [self.z, self.h], dim=-1).numpy()

    @torch.inference_mode()
    def advance(self, actions: np.ndarray) -> None:
        """Step M's recurrent state with the last observed latents and the actions taken (n of them)."""
        self.h, self.c = self.wm.mdnrnn.step(self.z, self.wm.encode_actions(actions), self.h, self.c)

    def dream_state(self) -> DreamState:
        """The current state as DreamCore's state, to dream on from here."""
        return DreamState(self.z.clone(), self.h.clone(), self.c.clone())


class RSSMFilter:
    """Follows n real episodes with the RSSM's posterior: z_t = mode of q(z | h_t, frame t), h_{t+1} = GRU(h_t, [z_t, a_t]).

    The posterior's mode (not a sample) keeps the real observation a deterministic function of the frames, as
    V's mean does for the MDN-RNN; the first step's mode is what the dream's initial-state bank holds.
    """

    def __init__(self, world_model: WorldModel, n: int = 1) -> None:
        self.wm = world_model
        self.model = world_model.rssm
        self.n = n
        self.reset()

    def reset(self) -> None:
        """New episodes: h_0 = 0."""
        self.deter = self.model.initial_deter(self.n)
        self.stoch: torch.Tensor | None = None

    @torch.inference_mode()
    def observe(self, frames: np.ndarray) -> np.ndarray:
        """Take in frames (n, 64, 64, 3) uint8; returns the latent observations concat(h_t, z_t), (n, obs_dim)."""
        embed = self.model.encode(frames_to_tensor(frames))
        self.stoch = mode_one_hot(self.model.posterior(self.deter, embed)).flatten(1)
        return self.model.feature(self.deter, self.stoch).numpy()

    @torch.inference_mode()
    def advance(self, actions: np.ndarray) -> None:
        """Step the GRU state with the last observed latents and the actions taken (n of them)."""
        self.deter = self.model.recur(self.deter, self.stoch, self.wm.encode_actions(actions))

    def dream_state(self) -> RSSMState:
        """The current state as RSSMDreamCore's state, to dream on from here."""
        return RSSMState(self.deter.clone(), self.stoch.clone())


def latent_filter(world_model: WorldModel, n: int = 1, obs_mode: str = "latent", encoding: str = "mean",
                  rng: np.random.Generator | None = None) -> MDNFilter | RSSMFilter:
    """The filter that turns n real episodes' frames and actions into the dream's latent observations (of obs_mode
    "latent" or "latent_cell"), by model kind; encoding "sample" draws V's z from its posterior with `rng`."""
    latent_dim(world_model, obs_mode)  # a clear error for a mode this bundle cannot give
    if world_model.model_kind == "rssm":
        if check_encoding(encoding) != "mean":
            raise ValueError("encoding 'sample' draws z from V's posterior; an RSSM bundle has no V (its real "
                             "observation is the posterior's mode): leave encoding at 'mean'")
        return RSSMFilter(world_model, n)
    return MDNFilter(world_model, n, cell=obs_mode == "latent_cell", encoding=encoding, rng=rng)


class RealEnv(gym.Env, EzPickle):
    """The bundle's real env with the dream's observation: the latent state (or the preprocessed frame).

    MDN-RNN: concat(z_t, h_t), z_t V's mean latent of the real frame, h_t M's LSTM state after (z_<t, a_<t);
    obs_mode "latent_cell" adds the LSTM cell state: concat(z_t, c_t, h_t).
    RSSM: concat(h_t, z_t), z_t the posterior's mode given h_t and the real frame. Both are stepped in the same
    order as the dream. Reward, termination and truncation come from the game.
    encoding "sample" (V + M only) draws z_t from V's posterior with the env's seeded np_random, as the original
    World Models code did: M learnt from such draws, and the dream's z carries their noise too.
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(
        self,
        bundle: str | Path,
        obs_mode: str = "latent",
        render_mode: str | None = None,
        env_kwargs: dict[str, Any] | None = None,
        encoding: str = "mean",
    ) -> None:
        EzPickle.__init__(self, bundle, obs_mode, render_mode, env_kwargs, encoding)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.world_model = load_world_model(bundle)
        self.obs_mode = obs_mode
        self.render_mode = render_mode
        self.action_space = self.world_model.action_space
        self.observation_space = observation_space(self.world_model, obs_mode)
        spec = self.world_model.frame_spec
        needs_render = spec.from_render or render_mode == "rgb_array"
        self.env = make_source_env(
            self.world_model.env_id, render_mode="rgb_array" if needs_render else None, **(env_kwargs or {})
        )
        self.encoding = encoding
        self._filter = latent_filter(self.world_model, obs_mode="latent" if obs_mode == "pixels" else obs_mode,
                                     encoding=encoding)
        self._started = False

    def _see(self, obs: Any) -> np.ndarray:
        frame = extract_frame(obs, self.env, self.world_model.frame_spec)
        latent = self._filter.observe(frame[None])[0]
        return frame if self.obs_mode == "pixels" else latent

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        obs, info = self.env.reset(seed=seed, options=options)
        self._filter.reset()
        self._filter.rng = self.np_random  # reseeded by reset(seed=...): the draws of "sample" replay with the seed
        self._started = True
        return self._see(obs), info

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if not self._started:
            raise gym.error.ResetNeeded("call reset() before step()")
        action = check_action(self.action_space, action)
        self._filter.advance(action[None])
        obs, reward, terminated, truncated, info = self.env.step(action)
        return self._see(obs), float(reward), bool(terminated), bool(truncated), info

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array":
            return None
        return self.env.render()

    def close(self) -> None:
        self.env.close()
        super().close()
