"""DreamEnv: a Gymnasium env that runs entirely inside a world model (no game engine), with a temperature knob."""
from __future__ import annotations

from pathlib import Path
from typing import Any, NamedTuple

import gymnasium as gym
import numpy as np
import torch
from gymnasium.utils import EzPickle

from dreamenv.envs.core import BatchedDreamCore
from dreamenv.envs.noise import Noise, NoiseBuffer
from dreamenv.envs.rssm_core import RSSMDreamCore
from dreamenv.envs.spaces import check_action, observation_space
from dreamenv.models.mdnrnn import MDNOutput, sample_mdn
from dreamenv.models.vae import tensor_to_frames
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel

DONE_MODES = ("sample", "threshold")
TRAINING_DONE_MODES = (*DONE_MODES, "expected")  # training may also weigh rewards by the chance of being alive
ALIVE_FLOOR = 0.01  # done_mode "expected": a dream stops once its chance of being alive is below this


def checked_done_mode(done_mode: str, modes: tuple[str, ...] = DONE_MODES) -> str:
    """done_mode itself, or a ValueError naming the modes allowed here."""
    if done_mode not in modes:
        raise ValueError(f"done_mode must be one of {modes}, got {done_mode!r}")
    return done_mode


class DreamState(NamedTuple):
    """Batched dream state: latent z_t (N, z_dim) and M's LSTM state h_t, c_t (N, hidden)."""

    z: torch.Tensor
    h: torch.Tensor
    c: torch.Tensor


class DreamCore(BatchedDreamCore):
    """Batched MDN-RNN dream dynamics shared by DreamVectorEnv, CMA-ES and evaluation (RSSMDreamCore: the same
    methods for the RSSM; dream_core() picks by model kind).

    The step works in preallocated buffers (fresh multi-MB tensors each step cost page faults): the LSTM
    gates alternate between two buffers, so a state stays valid for one more step and is then overwritten.
    Callers keep observations (copies), not old states.
    """

    def __init__(self, world_model: WorldModel) -> None:
        self.wm = world_model
        self.z_dim = world_model.z_dim
        self.hidden_size = world_model.hidden_size
        self.action_dim = world_model.mdnrnn.action_dim
        self.num_gaussians = world_model.mdnrnn.num_gaussians
        lstm_weight, lstm_bias, self.head_weight, self.head_bias = world_model.mdnrnn.fused_weights()
        # tanh(x) = 2 sigmoid(2x) - 1: torch's tanh kernel is about 3.5x slower than its sigmoid on this CPU, so
        # the g gate's weights are doubled and one sigmoid pass covers all four gates.
        gate_scale = torch.ones(4 * self.hidden_size)
        gate_scale[3 * self.hidden_size :] = 2.0
        # The GEMM's inner dimension is padded with zero rows to a multiple of 4 (MKL's sgemm: ~7% faster).
        self.input_dim = self.z_dim + self.action_dim + self.hidden_size
        self.lstm_weight = torch.zeros(-(-self.input_dim // 4) * 4, 4 * self.hidden_size)
        self.lstm_weight[: self.input_dim] = lstm_weight * gate_scale
        self.lstm_bias = lstm_bias * gate_scale
        self.noise_dims = (self.z_dim, self.z_dim)  # mixture choice and Gaussian noise per latent dim
        self._capacity = 0
        self._flip = 0

    def _buffers(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Views of the input, gate and tanh buffers for a batch of n; every buffer (self._heads too) grows when n
        exceeds the capacity."""
        if n > self._capacity:
            self._capacity = n
            self._inputs = torch.zeros(n, self.lstm_weight.shape[0])  # the padding columns stay zero
            self._gates = (torch.empty(n, 4 * self.hidden_size), torch.empty(n, 4 * self.hidden_size))
            self._tanh = torch.empty(n, self.hidden_size)
            self._heads = torch.empty(n, self.head_weight.shape[1])
        self._flip ^= 1
        return self._inputs[:n], self._gates[self._flip][:n], self._tanh[:n]

    def initial_state(self, index: np.ndarray) -> DreamState:
        """z_0 = entries `index` of the bank of encoded first frames, h_0 = c_0 = 0."""
        zeros = torch.zeros(len(index), self.hidden_size)
        return DreamState(self.wm.initial_z[torch.as_tensor(index)].clone(), zeros, zeros.clone())

    @torch.inference_mode()
    def recurrent_step(self, state: DreamState, actions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """M's LSTM alone: (h', c') from (z, a, h, c), without the MDN and reward heads (the done critics need no more)."""
        z_dim, hidden = self.z_dim, self.hidden_size
        inputs, gates, tanh_c = self._buffers(state.z.shape[0])
        inputs[:, :z_dim] = state.z
        inputs[:, z_dim : z_dim + self.action_dim] = actions
        inputs[:, z_dim + self.action_dim : self.input_dim] = state.h
        torch.addmm(self.lstm_bias, inputs, self.lstm_weight, out=gates)  # gates (i, f, o, 2 g)
        i, f, o, g = gates.sigmoid_().split(hidden, dim=1)
        g.mul_(2.0).sub_(1.0)  # tanh of the g gate's input
        c = f.mul_(state.c).addcmul_(i, g)
        torch.mul(c, 2.0, out=tanh_c).sigmoid_().mul_(2.0).sub_(1.0)
        return o.mul_(tanh_c), c

    @torch.inference_mode()
    def step(
        self,
        state: DreamState,
        actions: torch.Tensor,
        temperature: float | torch.Tensor,
        noise: Noise,
        done_mode: str = "sample",
        done_threshold: float = 0.5,
    ) -> tuple[DreamState, np.ndarray, np.ndarray]:
        """h' = M(z, a, h); z' ~ MDN(h') at temperature; reward and termination from M's heads."""
        n, z_dim, k = state.z.shape[0], self.z_dim, self.num_gaussians
        h, c = self.recurrent_step(state, actions)
        heads = self._heads[:n]
        torch.addmm(self.head_bias, h, self.head_weight, out=heads)
        logpi, mu, logsigma = heads[:, :-2].view(n, z_dim, 3 * k).split(k, dim=-1)
        out = MDNOutput(logpi, mu, logsigma.clamp(-8.0, 4.0), heads[:, -2], heads[:, -1])
        z = sample_mdn(out, temperature, torch.from_numpy(noise.uniform), torch.from_numpy(noise.normal))
        done_prob = torch.sigmoid(out.done_logit).numpy()
        terminated = noise.done < done_prob if done_mode == "sample" else done_prob > done_threshold
        return DreamState(z, h, c), out.reward.numpy().astype(np.float32), terminated

    @torch.inference_mode()
    def done_probability(self, state: DreamState) -> np.ndarray:
        """The done head's p(done) (N,) for the step that led to `state` (M's head reads h_{t+1})."""
        return torch.sigmoid(self.wm.mdnrnn.done_head(state.h).squeeze(-1)).numpy()

    def latent_obs(self, state: DreamState, cell: bool = False) -> np.ndarray:
        """concat(z_t, h_t) as float32 (N, z_dim + hidden); with `cell`, concat(z_t, c_t, h_t) (N, z_dim + 2 hidden)."""
        return torch.cat([state.z, state.c, state.h] if cell else [state.z, state.h], dim=-1).numpy()

    @torch.inference_mode()
    def pixels(self, state: DreamState) -> np.ndarray:
        """V's decoding of z_t as uint8 (N, 64, 64, 3)."""
        return tensor_to_frames(self.wm.vae.decode(state.z))


class SingleDream:
    """One env's dream step in numpy, the same math as DreamCore.step: at batch 1 a few BLAS calls cost far
    less than DreamCore's ~40 torch op dispatches. State is (z, h, c), 1-D float32 arrays."""

    def __init__(self, world_model: WorldModel) -> None:
        self.wm = world_model
        self.z_dim, self.hidden = world_model.z_dim, world_model.hidden_size
        self.noise_dims = (self.z_dim, self.z_dim)
        self.k = world_model.mdnrnn.num_gaussians
        weights = world_model.mdnrnn.fused_weights()
        self.lstm_weight, self.lstm_bias, self.head_weight, self.head_bias = (w.numpy() for w in weights)
        self.initial_z = world_model.initial_z.numpy()
        self.component = np.arange(self.z_dim)
        discrete = isinstance(world_model.action_space, gym.spaces.Discrete)
        self.one_hot = np.eye(int(world_model.action_space.n), dtype=np.float32) if discrete else None

    def reset(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """z_0 from the bank (same draw as DreamCore), h_0 = c_0 = 0."""
        z = self.initial_z[int(rng.integers(0, self.initial_z.shape[0]))].copy()
        return z, np.zeros(self.hidden, np.float32), np.zeros(self.hidden, np.float32)

    def step(self, state: tuple[np.ndarray, np.ndarray, np.ndarray], action: np.ndarray, temperature: float, noise: Noise,
             done_mode: str, done_threshold: float) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], float, bool]:
        """((z, h, c), a) -> ((z', h', c'), reward, terminated)."""
        z, h, c = state
        hid = self.hidden
        a = self.one_hot[int(action) - int(self.wm.action_space.start)] if self.one_hot is not None else action.reshape(-1)
        gates = np.concatenate([z, a, h]) @ self.lstm_weight + self.lstm_bias
        sig = 1.0 / (1.0 + np.exp(-gates[: 3 * hid]))
        c = sig[hid : 2 * hid] * c + sig[:hid] * np.tanh(gates[3 * hid :])
        h = sig[2 * hid :] * np.tanh(c)
        out = h @ self.head_weight + self.head_bias
        mixture = out[:-2].reshape(self.z_dim, 3 * self.k)
        logpi, mu, logsigma = mixture[:, : self.k], mixture[:, self.k : 2 * self.k], mixture[:, 2 * self.k :]
        weights = np.exp((logpi - logpi.max(1, keepdims=True)) * (1.0 / max(temperature, 1e-4)))
        cdf = np.cumsum(weights, 1)
        index = np.minimum((noise.uniform[0, :, None] * cdf[:, -1:] >= cdf).sum(1), self.k - 1)
        sigma = np.exp(np.clip(logsigma[self.component, index], -8.0, 4.0))
        z = (mu[self.component, index] + sigma * np.sqrt(temperature) * noise.normal[0]).astype(np.float32)
        done_prob = 0.5 * (1.0 + np.tanh(0.5 * out[-1]))  # sigmoid, without overflow for large logits
        terminated = noise.done[0] < done_prob if done_mode == "sample" else done_prob > done_threshold
        return (z, h.astype(np.float32), c.astype(np.float32)), float(out[-2]), bool(terminated)

    def latent_obs(self, state: tuple[np.ndarray, np.ndarray, np.ndarray], cell: bool = False) -> np.ndarray:
        """concat(z_t, h_t), float32; with `cell`, concat(z_t, c_t, h_t)."""
        z, h, c = state
        return np.concatenate([z, c, h] if cell else [z, h])

    @torch.inference_mode()
    def pixels(self, state: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
        """V's decoding of z_t, uint8 (64, 64, 3)."""
        return tensor_to_frames(self.wm.vae.decode(torch.from_numpy(state[0])[None]))[0]


class BatchOfOneDream:
    """One env's dream as a batch of one through a batched core: the single-env path of models without a numpy one."""

    def __init__(self, world_model: WorldModel, core: DreamCore | RSSMDreamCore) -> None:
        self.wm = world_model
        self.core = core
        self.noise_dims = core.noise_dims

    def reset(self, rng: np.random.Generator) -> tuple[torch.Tensor, ...]:
        """A batch-of-one initial state, drawn from the bank as the batched core draws it."""
        return self.core.initial_state(self.core.draw_initial(rng))

    def step(self, state: tuple[torch.Tensor, ...], action: np.ndarray, temperature: float, noise: Noise,
             done_mode: str, done_threshold: float) -> tuple[tuple[torch.Tensor, ...], float, bool]:
        """(state, a) -> (state', reward, terminated)."""
        actions = self.wm.encode_actions(np.asarray(action)[None])
        state, reward, terminated = self.core.step(state, actions, temperature, noise, done_mode, done_threshold)
        return state, float(reward[0]), bool(terminated[0])

    def latent_obs(self, state: tuple[torch.Tensor, ...], cell: bool = False) -> np.ndarray:
        """The latent observation of the one env."""
        return self.core.latent_obs(state, cell)[0]

    def pixels(self, state: tuple[torch.Tensor, ...]) -> np.ndarray:
        """The decoded frame of the one env, uint8 (64, 64, 3)."""
        return self.core.pixels(state)[0]


def dream_core(world_model: WorldModel) -> DreamCore | RSSMDreamCore:
    """The batched dream dynamics of a world model, by its kind (MDN-RNN or RSSM); both have the same methods."""
    return RSSMDreamCore(world_model) if world_model.model_kind == "rssm" else DreamCore(world_model)


def single_dream(world_model: WorldModel) -> SingleDream | BatchOfOneDream:
    """The single-env dream of a world model: numpy for the MDN-RNN, a batch of one for the RSSM."""
    if world_model.model_kind == "rssm":
        return BatchOfOneDream(world_model, RSSMDreamCore(world_model))
    return SingleDream(world_model)


class DreamEnv(gym.Env, EzPickle):
    """A world model as a gym.Env: observation concat(z, h) (RSSM: concat(h, z)) or decoded pixels, reward and
    done from the model's heads.

    Args:
        bundle: a bundle directory or a shipped name such as "VizdoomTakeCover"; an MDN-RNN or an RSSM bundle.
        temperature: tau of the sampling (MDN mixture, or RSSM categorical logits / tau); None takes the
            bundle's default. Settable between episodes through `env.unwrapped.temperature` or
            `reset(options={"temperature": tau})`.
        obs_mode: "latent" (the model's latent state, float32), "latent_cell" (MDN-RNN only: the latent state with
            M's LSTM cell state, concat(z, c, h), as the original code's Doom controller saw it) or "pixels"
            (64x64x3 uint8 decoded frame).
        done_mode: "sample" (Bernoulli of the done probability; RSSM: 1 - p(continue)) or "threshold".
        done_threshold: probability above which an episode ends in "threshold" mode.
        render_mode: None or "rgb_array" (the decoded frame).
    """

    metadata = {"render_modes": ["rgb_array"], "render_fps": 35}

    def __init__(
        self,
        bundle: str | Path,
        temperature: float | None = None,
        obs_mode: str = "latent",
        done_mode: str = "sample",
        done_threshold: float = 0.5,
        render_mode: str | None = None,
    ) -> None:
        EzPickle.__init__(self, bundle, temperature, obs_mode, done_mode, done_threshold, render_mode)
        checked_done_mode(done_mode)
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"render_mode must be None or 'rgb_array', got {render_mode!r}")
        self.world_model = load_world_model(bundle)
        self.dream = single_dream(self.world_model)
        self.temperature = self.world_model.default_temperature if temperature is None else float(temperature)
        check_temperature(self.temperature)
        self.obs_mode = obs_mode
        self.done_mode = done_mode
        self.done_threshold = float(done_threshold)
        self.render_mode = render_mode
        self.action_space = self.world_model.action_space
        self.observation_space = observation_space(self.world_model, obs_mode)
        self._state: tuple | None = None  # the model's state: (z, h, c) arrays, or a batch-of-one state
        self._noise = NoiseBuffer(1, *self.dream.noise_dims)

    def _observation(self) -> np.ndarray:
        if self.obs_mode == "pixels":
            return self.dream.pixels(self._state)
        return self.dream.latent_obs(self._state, cell=self.obs_mode == "latent_cell")

    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        if options and "temperature" in options:
            self.temperature = check_temperature(float(options["temperature"]))
        self._noise.clear(0)
        self._state = self.dream.reset(self.np_random)
        return self._observation(), {"temperature": self.temperature}

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self._state is None:
            raise gym.error.ResetNeeded("call reset() before step()")
        action = check_action(self.action_space, action)
        noise = self._noise.draw([self.np_random])
        self._state, reward, terminated = self.dream.step(
            self._state, action, self.temperature, noise, self.done_mode, self.done_threshold
        )
        return self._observation(), reward, terminated, False, {}

    def render(self) -> np.ndarray | None:
        if self.render_mode != "rgb_array" or self._state is None:
            return None
        return self.dream.pixels(self._state)


def check_temperature(temperature: float) -> float:
    """Temperature must be a finite number >= 0."""
    if not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
    return temperature
