"""The RSSM's batched dream step: the same interface as DreamCore, so every env and agent dreams with either model."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from dreamenv.envs.core import BatchedDreamCore
from dreamenv.envs.noise import Noise
from dreamenv.models.rssm import sample_class, symexp
from dreamenv.models.vae import tensor_to_frames
from dreamenv.worldmodel import WorldModel


class RSSMState(NamedTuple):
    """Batched RSSM state: deterministic h_t (N, deter) and one-hot categorical z_t (N, stoch * classes)."""

    deter: torch.Tensor
    stoch: torch.Tensor


def split_first_linear(head: nn.Sequential) -> tuple[nn.Linear, list[nn.Module]]:
    """An MLP head's first linear layer and the modules after it."""
    first = head[0]
    if isinstance(first, nn.Sequential):  # a dense layer: Linear -> LayerNorm -> SiLU
        return first[0], [*first[1:], *head[1:]]
    return first, list(head[1:])


class RSSMDreamCore(BatchedDreamCore):
    """Batched RSSM dreams: h' = GRU(h, [z, a]); z' ~ prior(h') at temperature; reward and continue heads on [h', z'].

    The same math as the RSSM's modules, arranged for the dream: z is one-hot, so a linear layer reading z is a
    sum of one weight row per latent (an embedding bag) instead of a matmul over stoch * classes inputs, and the
    reward and continue heads share one matmul for their first layers.
    """

    def __init__(self, world_model: WorldModel) -> None:
        if world_model.rssm is None:
            raise ValueError(f"RSSMDreamCore needs an RSSM world model, got a '{world_model.model_kind}' one")
        self.wm = world_model
        self.model = model = world_model.rssm
        config = model.config
        self.noise_dims = (config.stoch, 0)  # one uniform per categorical latent, no Gaussian noise
        self.offsets = torch.arange(config.stoch) * config.classes  # latent i's class c is row i * classes + c
        heads = [split_first_linear(model.reward_head), split_first_linear(model.continue_head)]
        with torch.no_grad():
            img = model.img_in[0].weight  # (hidden, z_dim + action_dim), no bias
            self.img_action = img[:, model.z_dim :].t().contiguous()
            self.img_rows = img[:, : model.z_dim].t().contiguous()
            # (both heads' widths, deter + z_dim); a continue head on h alone reads z through zero weights
            first = torch.cat([F.pad(linear.weight, (0, model.feat_dim - linear.in_features)) for linear, _ in heads])
            self.head_deter = first[:, : model.deter_dim].t().contiguous()
            self.head_rows = first[:, model.deter_dim :].t().contiguous()
            self.head_bias = torch.cat([linear.bias if linear.bias is not None else torch.zeros(linear.out_features)
                                        for linear, _ in heads])
        self.img_after = list(model.img_in[1:])
        self.head_widths = [linear.out_features for linear, _ in heads]
        self.reward_after, self.continue_after = (after for _, after in heads)

    def _rows_sum(self, classes: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """one_hot(classes) flattened @ rows: one row per latent, summed. classes (N, stoch) -> (N, width)."""
        return F.embedding_bag(classes + self.offsets, rows, mode="sum")

    def initial_state(self, index: np.ndarray) -> RSSMState:
        """z_0 = entries `index` of the bank of first-frame posteriors, h_0 = 0."""
        return RSSMState(self.model.initial_deter(len(index)), self.wm.initial_z[torch.as_tensor(index)].clone())

    @torch.inference_mode()
    def step(
        self,
        state: RSSMState,
        actions: torch.Tensor,
        temperature: float | torch.Tensor,
        noise: Noise,
        done_mode: str = "sample",
        done_threshold: float = 0.5,
    ) -> tuple[RSSMState, np.ndarray, np.ndarray]:
        """One imagined step for the batch: (next state, rewards (N,) float32, terminated (N,) bool)."""
        config = self.model.config
        classes = state.stoch.view(-1, config.stoch, config.classes).argmax(-1)
        x = self._rows_sum(classes, self.img_rows) + actions @ self.img_action
        for module in self.img_after:
            x = module(x)
        deter = self.model.gru(x, state.deter)
        classes = sample_class(self.model.prior(deter), temperature, torch.from_numpy(noise.uniform))
        stoch = F.one_hot(classes, config.classes).flatten(1).float()
        first = torch.addmm(self.head_bias, deter, self.head_deter) + self._rows_sum(classes, self.head_rows)
        reward, cont = first.split(self.head_widths, -1)
        for module in self.reward_after:
            reward = module(reward)
        for module in self.continue_after:
            cont = module(cont)
        reward = symexp(reward.squeeze(-1)).numpy().astype(np.float32)
        done_prob = torch.sigmoid(-cont.squeeze(-1)).numpy()  # 1 - p(continue)
        terminated = noise.done < done_prob if done_mode == "sample" else done_prob > done_threshold
        return RSSMState(deter, stoch), reward, terminated

    @torch.inference_mode()
    def done_probability(self, state: RSSMState) -> np.ndarray:
        """1 - p(continue) (N,) for the step that led to `state` (the continue head reads [h_{t+1}, z_{t+1}] or h_{t+1})."""
        return torch.sigmoid(-self.model.continue_logit(self.model.feature(state.deter, state.stoch))).numpy()

    def latent_obs(self, state: RSSMState, cell: bool = False) -> np.ndarray:
        """concat(h_t, z_t) as float32 (N, deter + stoch * classes); the GRU has no cell state to add."""
        if cell:
            raise ValueError("obs_mode 'latent_cell' needs an MDN-RNN bundle: the RSSM has no LSTM cell state")
        return self.model.feature(state.deter, state.stoch).numpy()

    @torch.inference_mode()
    def pixels(self, state: RSSMState) -> np.ndarray:
        """The decoder's frame of the state as uint8 (N, 64, 64, 3)."""
        return tensor_to_frames(self.model.decode(self.model.feature(state.deter, state.stoch)))
