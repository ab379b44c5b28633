"""Train V then M on a rollout store, resumably, and write the world-model bundle."""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

import gymnasium as gym

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy, save_file as save_numpy
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from dreamenv.checkpointing import load_checkpoint, save_checkpoint
from dreamenv.data.dataset import (
    EpisodeData, hit_flags, iterate_frame_batches, open_rollouts, sequence_batches, split_episode_ids,
)
from dreamenv.data.sources import make_source_env
from dreamenv.metrics import DoneScores
from dreamenv.models.mdnrnn import MDNRNN, MDNRNNConfig, mdn_nll, sample_mdn
from dreamenv.models.vae import ConvVAE, VAEConfig, frames_to_tensor, vae_loss
from dreamenv.registry import load_world_model
from dreamenv.worldmodel import WorldModel

CHECKPOINT_SECONDS = 120.0  # a killed run loses at most this much training


@dataclass
class TrainConfig:
    """The whole world-model recipe: V, M, and how the data is split."""

    vae: VAEConfig = field(default_factory=VAEConfig)
    mdnrnn: MDNRNNConfig = field(default_factory=MDNRNNConfig)
    holdout_fraction: float = 0.1
    seed: int = 0
    default_temperature: float = 1.0
    initial_states: int = 1000  # size of the bank of encoded first frames used by reset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        data = dict(data)
        vae = VAEConfig(**data.pop("vae", {}))
        mdnrnn = MDNRNNConfig(**data.pop("mdnrnn", {}))
        return cls(vae=vae, mdnrnn=mdnrnn, **data)


def train_vae(
    frames: np.ndarray, config: VAEConfig, checkpoint_dir: Path, seed: int = 0, progress: bool = True,
    index: np.ndarray | None = None, init: ConvVAE | None = None,
) -> ConvVAE:
    """Train the ConvVAE on uint8 frames (N, 64, 64, 3), or on their ascending rows `index`, resuming from
    checkpoint_dir when it holds a run; `init` (a trained V of the same z_dim) is the starting point of a new run."""
    torch.manual_seed(seed)
    vae = ConvVAE(config.z_dim)
    if init is not None:
        if init.z_dim != config.z_dim:
            raise ValueError(f"the V to start from has z_dim {init.z_dim}, the recipe {config.z_dim}: set --z-dim {init.z_dim}")
        vae.load_state_dict(init.state_dict())
    optimizer = torch.optim.Adam(vae.parameters(), lr=config.learning_rate)
    state = load_checkpoint(checkpoint_dir, vae, optimizer) or {"epoch": 0, "batch": 0}
    n_batches = math.ceil((len(frames) if index is None else len(index)) / config.batch_size)
    bar = tqdm(total=config.epochs * n_batches, initial=state["epoch"] * n_batches + state["batch"],
               desc="train V", unit="batch", disable=not progress)
    last_save = time.monotonic()
    vae.train()
    for epoch in range(state["epoch"], config.epochs):
        first = state["batch"] if epoch == state["epoch"] else 0
        for b, x in iterate_frame_batches(frames, config.batch_size, seed + epoch, first, index):
            recon, mu, logvar = vae(x)
            loss, rec, kl = vae_loss(recon, x, mu, logvar, config.kl_tolerance)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, rec=f"{rec.item():.1f}", kl=f"{kl.item():.1f}")
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint(checkpoint_dir, vae, optimizer, {"epoch": epoch, "batch": b + 1})
                last_save = time.monotonic()
        save_checkpoint(checkpoint_dir, vae, optimizer, {"epoch": epoch + 1, "batch": 0})
    bar.close()
    vae.eval()
    return vae


@torch.inference_mode()
def encode_frames(vae: ConvVAE, frames: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """V's (mu, logvar) of every frame, float32 (N, z_dim) each."""
    mus, logvars = [], []
    for start in range(0, len(frames), batch_size):
        mu, logvar = vae.encode(frames_to_tensor(frames[start : start + batch_size]))
        mus.append(mu.numpy())
        logvars.append(logvar.numpy())
    return np.concatenate(mus), np.concatenate(logvars)


@torch.inference_mode()
def vae_heldout_loss(vae: ConvVAE, frames: np.ndarray, kl_tolerance: float, batch_size: int = 256) -> dict[str, float]:
    """Mean reconstruction (summed squared error per frame) and KL on held-out frames, z = mu."""
    rec_sum, kl_sum = 0.0, 0.0
    for start in range(0, len(frames), batch_size):
        x = frames_to_tensor(frames[start : start + batch_size])
        mu, logvar = vae.encode(x)
        _, rec, kl = vae_loss(vae.decode(mu), x, mu, logvar, 0.0)
        rec_sum += rec.item() * len(x)
        kl_sum += kl.item() * len(x)
    n = max(len(frames), 1)
    return {"reconstruction": rec_sum / n, "kl": kl_sum / n, "frames": len(frames)}


@torch.no_grad()
def scheduled_inputs(model: MDNRNN, z: torch.Tensor, actions: torch.Tensor, probability: float) -> torch.Tensor:
    """Parallel scheduled sampling (Duckworth et al. 2019): a first, teacher-forced pass draws M's own z_{t+1} at
    tau 1, and each input z_t after the first is replaced by that draw with `probability`, so that M learns from
    inputs like those it feeds itself in a dream, against the data's targets."""
    out, _ = model(z, actions)
    drawn = sample_mdn(out, 1.0, torch.rand(z.shape), torch.randn(z.shape))  # drawn[:, t] stands for z_{t+1}
    swap = torch.rand(z.shape[:2]) < probability
    swap[:, 0] = False
    return torch.where(swap.unsqueeze(-1), torch.cat([z[:, :1], drawn[:, :-1]], dim=1), z)


class HitHead(NamedTuple):
    """A training-only head on M's h that predicts hits (MDNRNNConfig.hit_weight), and its positive-class weight."""

    linear: nn.Linear
    pos_weight: float


def _masked_bce(logit: torch.Tensor, target: torch.Tensor, pos_weight: float, mask: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with positives weighted by pos_weight, averaged over the real (mask) steps."""
    loss = F.binary_cross_entropy_with_logits(logit, target, pos_weight=torch.tensor(pos_weight), reduction="none")
    return (loss * mask).sum() / mask.sum()


def _mdnrnn_losses(
    model: MDNRNN, batch: dict[str, torch.Tensor], config: MDNRNNConfig, pos_weight: float, sample: bool,
    hit_head: HitHead | None = None,
) -> dict[str, torch.Tensor]:
    z = batch["mu"]
    if sample:
        z = z + torch.randn_like(z) * torch.exp(0.5 * batch["logvar"])
    inputs = z[:, :-1]
    if config.scheduled_sampling > 0:
        inputs = scheduled_inputs(model, inputs, batch["actions"], config.scheduled_sampling)
    h, _ = model.lstm(torch.cat([inputs, batch["actions"]], dim=-1))
    out = model.heads(h)
    step_mask, next_mask = batch["step_mask"], batch["next_mask"]
    nll = (mdn_nll(out, z[:, 1:]) * next_mask).sum() / next_mask.sum().clamp(min=1)
    reward = ((out.reward - batch["rewards"]).pow(2) * step_mask).sum() / step_mask.sum()
    done = _masked_bce(out.done_logit, batch["dones"], pos_weight, step_mask)
    losses = {"nll": nll, "reward_mse": reward, "done_bce": done}
    total = nll + config.reward_weight * reward + config.done_weight * done
    if hit_head is not None:
        losses["hit_bce"] = _masked_bce(hit_head.linear(h).squeeze(-1), batch["hits"], hit_head.pos_weight, step_mask)
        total = total + config.hit_weight * losses["hit_bce"]
    return {"loss": total, **losses}


def class_balance(flags: Sequence[np.ndarray]) -> float:
    """#unflagged / #flagged steps: the weight that makes rare flagged steps count as much as the rest."""
    steps = sum(len(f) for f in flags)
    flagged = sum(float(f.sum()) for f in flags)
    return float(max(steps - flagged, 1.0) / max(flagged, 1.0))


def terminal_balance(episodes: list[EpisodeData]) -> float:
    """#non-terminal / #terminal steps: the weight that makes the rare terminal steps count as much as the rest."""
    return class_balance([e.terminated for e in episodes])


def done_pos_weight(episodes: list[EpisodeData], config: MDNRNNConfig) -> float:
    """Weight of terminal steps in the done loss: the configured one, or terminal_balance."""
    if config.done_pos_weight is not None:
        return float(config.done_pos_weight)
    return terminal_balance(episodes)


DONE_REFIT_BATCH = 1024  # steps per update of the done-head refit
DONE_REFIT_LEARNING_RATE = 1e-3


@torch.no_grad()
def whole_episode_h(model: MDNRNN, episodes: list[EpisodeData], config: MDNRNNConfig, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """M's h_{t+1} after every step of whole episodes, from h_0 = 0 as a dream or the real env follows them (not cut
    into training pieces), with inputs as M learnt from them (V's posterior draws or its means); and each step's done flag."""
    generator = torch.Generator().manual_seed(seed)
    hs, dones = [], []
    longest = max(len(e.actions) for e in episodes)
    for batch in sequence_batches(episodes, longest, config.batch_size, np.random.default_rng(seed)):
        z = batch["mu"][:, :-1]
        if config.sample_latents:
            z = z + torch.randn(z.shape, generator=generator) * torch.exp(0.5 * batch["logvar"][:, :-1])
        out, _ = model.lstm(torch.cat([z, batch["actions"]], dim=-1))
        real = batch["step_mask"] > 0
        hs.append(out[real])
        dones.append(batch["dones"][real])
    return torch.cat(hs), torch.cat(dones)


def refit_done_head(model: MDNRNN, episodes: list[EpisodeData], config: MDNRNNConfig, pos_weight: float, seed: int = 0,
                    progress: bool = True) -> None:
    """Fit the done head alone for config.done_refit_epochs on the frozen LSTM's whole-episode h, with the training
    loss's terminal weight (its logits stay in that weighted scale, which train_mdnrnn then calibrates). Jointly
    trained, the head learnt deaths from training pieces; this fits it to the states a dream reaches, late ones too."""
    h, dones = whole_episode_h(model, episodes, config, seed)
    optimizer = torch.optim.Adam(model.done_head.parameters(), lr=DONE_REFIT_LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    weight = torch.tensor(pos_weight)
    for _ in tqdm(range(config.done_refit_epochs), desc="refit done head", unit="epoch", disable=not progress):
        for rows in torch.randperm(len(dones), generator=generator).split(DONE_REFIT_BATCH):
            logit = model.done_head(h[rows]).squeeze(-1)
            loss = F.binary_cross_entropy_with_logits(logit, dones[rows], pos_weight=weight)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


def _hit_head(episodes: list[EpisodeData], config: MDNRNNConfig) -> HitHead | None:
    """The hit head config.hit_weight asks for, its hits weighted as the done head's deaths; None without it."""
    if not config.hit_weight:
        return None
    if any(e.hits is None for e in episodes):
        raise ValueError("hit_weight needs hit flags, which come from the game variables of the stores (VizDoom's "
                         "health): collect the data again with this version's `dreamenv collect`, which records them, "
                         "or set hit_weight = 0")
    return HitHead(nn.Linear(config.hidden_size, 1), class_balance([e.hits for e in episodes]))


def train_mdnrnn(
    episodes: list[EpisodeData], config: MDNRNNConfig, checkpoint_dir: Path, seed: int = 0, progress: bool = True,
    init: MDNRNN | None = None,
) -> tuple[MDNRNN, float]:
    """Train M on per-episode latents, resumable; returns the model with a calibrated done head, and the pos weight.

    init: a trained M (calibrated, as bundles store it) to start from instead of random weights (warm start).
    """
    torch.manual_seed(seed)
    z_dim, a_dim = episodes[0].mu.shape[1], episodes[0].actions.shape[1]
    model = MDNRNN(z_dim, a_dim, config.hidden_size, config.num_gaussians)
    hit_head = _hit_head(episodes, config)
    trained = model if hit_head is None else nn.ModuleDict({"mdnrnn": model, "hit_head": hit_head.linear})
    optimizer = torch.optim.Adam(trained.parameters(), lr=config.learning_rate)
    pos_weight = done_pos_weight(episodes, config)
    state = load_checkpoint(checkpoint_dir, trained, optimizer)
    if state is None and init is not None:
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if shapes != {k: tuple(v.shape) for k, v in init.state_dict().items()}:
            raise ValueError("the warm-start M has other sizes than this recipe's (z, action, LSTM, Gaussians): "
                             "start from a bundle trained with the same sizes, or drop the warm start")
        model.load_state_dict(init.state_dict())
        with torch.no_grad():  # back to the weighted-loss logits the training objective expects
            model.done_head.bias += math.log(pos_weight)
    state = state or {"epoch": 0}
    bar = tqdm(total=config.epochs, initial=state["epoch"], desc="train M", unit="epoch", disable=not progress)
    model.train()
    for epoch in range(state["epoch"], config.epochs):
        rng = np.random.default_rng(seed + epoch)
        totals: dict[str, float] = {}
        for count, batch in enumerate(sequence_batches(episodes, config.seq_len, config.batch_size, rng), start=1):
            losses = _mdnrnn_losses(model, batch, config, pos_weight, config.sample_latents, hit_head)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
            optimizer.step()
            for k, v in losses.items():
                totals[k] = totals.get(k, 0.0) + (v.item() - totals.get(k, 0.0)) / count
        save_checkpoint(checkpoint_dir, trained, optimizer, {"epoch": epoch + 1})
        bar.update(1)
        bar.set_postfix({k: f"{v:.3f}" for k, v in totals.items() if k != "loss"})
    bar.close()
    model.eval()
    if config.done_refit_epochs:
        refit_done_head(model, episodes, config, pos_weight, seed, progress)
    with torch.no_grad():  # weighted BCE shifts logits by log(pos_weight); undo it so p(done) is calibrated
        model.done_head.bias -= math.log(pos_weight)
    return model, pos_weight


@torch.inference_mode()
def mdnrnn_heldout_metrics(model: MDNRNN, episodes: list[EpisodeData], config: MDNRNNConfig) -> dict[str, float]:
    """Held-out z NLL, reward error, done scores (dreamenv.metrics.DoneScores), and how
    well the reward head's teacher-forced episode returns track the real ones (Pearson r, mean abs. error)."""
    if not episodes:
        return {}
    nll_sum = nll_n = rew_sq = rew_abs = steps = 0.0
    done = DoneScores()
    real_returns: list[float] = []
    predicted_returns: list[float] = []
    whole_episodes = max(len(e.actions) for e in episodes)  # one row per episode, so rows sum to episode returns
    for batch in sequence_batches(episodes, whole_episodes, 16, np.random.default_rng(0)):
        out, _ = model(batch["mu"][:, :-1], batch["actions"])
        step_mask, next_mask = batch["step_mask"], batch["next_mask"]
        nll_sum += (mdn_nll(out, batch["mu"][:, 1:]) * next_mask).sum().item()
        nll_n += next_mask.sum().item()
        err = (out.reward - batch["rewards"]) * step_mask
        rew_sq += err.pow(2).sum().item()
        rew_abs += err.abs().sum().item()
        steps += step_mask.sum().item()
        real_returns += (batch["rewards"] * step_mask).sum(1).tolist()
        predicted_returns += (out.reward * step_mask).sum(1).tolist()
        done.add(torch.sigmoid(out.done_logit), batch["dones"], step_mask)
    return {
        "z_nll": nll_sum / max(nll_n, 1),
        "reward_mse": rew_sq / steps,
        "reward_mae": rew_abs / steps,
        **done.metrics(),
        **return_metrics(real_returns, predicted_returns),
        "steps": steps,
        "episodes": len(episodes),
    }


def return_metrics(real: Sequence[float], predicted: Sequence[float]) -> dict[str, float | None]:
    """How well predicted episode returns follow the real ones: Pearson correlation (None with fewer than 2 episodes
    or no spread) and mean absolute error; can the dream rank good play above bad?"""
    spread = len(real) >= 2 and np.std(real) > 0 and np.std(predicted) > 0
    return {"return_correlation": float(np.corrcoef(real, predicted)[0, 1]) if spread else None,
            "return_mae": float(np.mean(np.abs(np.subtract(predicted, real))))}


def encode_action_array(space: gym.Space, actions: np.ndarray) -> np.ndarray:
    """Stored actions (N, ...) -> float32 (N, action_dim) model inputs: one-hot for Discrete, flat for Box."""
    if isinstance(space, gym.spaces.Discrete):
        return np.eye(space.n, dtype=np.float32)[actions.astype(np.int64).reshape(-1) - space.start]
    return actions.astype(np.float32).reshape(len(actions), -1)


def data_summary(paths: Sequence[str | Path], bounds: np.ndarray, rewards: np.ndarray, train_ids: np.ndarray,
                 heldout_ids: np.ndarray) -> dict[str, Any]:
    """The bundle's record of what it was trained on: stores, episode counts and split, mean return and length."""
    returns = [float(rewards[s:e].sum()) for s, e in bounds]
    return {"rollouts": [str(p) for p in paths], "episodes": int(len(bounds)), "steps": int(bounds[-1, 1]),
            "train_episodes": int(len(train_ids)), "heldout_episodes": int(len(heldout_ids)),
            "episode_return_mean": float(np.mean(returns)), "episode_length_mean": float(np.mean(bounds[:, 1] - bounds[:, 0]))}


def episode_data(bounds: np.ndarray, ids: np.ndarray, mu: np.ndarray, logvar: np.ndarray,
                 arrays: dict[str, np.ndarray], world_actions: Callable[[np.ndarray], np.ndarray]) -> list[EpisodeData]:
    """Episodes `ids` of the [start, end) `bounds` into latents and step arrays, as M trains and is scored on them
    (with hit flags when the stores hold game variables)."""
    variables = arrays.get("game_variables")
    return [
        EpisodeData(
            mu=mu[s:e], logvar=logvar[s:e], actions=world_actions(arrays["actions"][s:e]),
            rewards=arrays["rewards"][s:e].astype(np.float32), terminated=arrays["terminated"][s:e].astype(np.float32),
            hits=hit_flags(variables[s:e], arrays["terminated"][s:e]) if variables is not None else None,
        )
        for s, e in (bounds[i] for i in ids)
    ]


@dataclass
class RolloutData:
    """One or more rollout stores of one env, loaded and concatenated: what train_world_model trains on."""

    env_id: str
    frame_spec: Any
    action_space: gym.Space
    bounds: np.ndarray  # (E, 2) [start, end) of every episode in the concatenation
    arrays: dict[str, np.ndarray]
    frames: np.ndarray | None  # None when loaded without frames (read them with encode_stores / read_frames)


def load_rollout_data(paths: Sequence[str | Path], with_frames: bool = True) -> RolloutData:
    """Load every store in `paths` (e.g. random rollouts plus each iterative round's) into one dataset.

    with_frames=False loads everything but the frames, which are most of the memory (12 KB a step: 3,600 TakeCover
    episodes are 10 GB), for training M through a V that is already trained.
    """
    parts = []
    for path in paths:
        with open_rollouts(path) as r:
            parts.append((r.env_id, r.frame_spec, r.action_space, r.episode_bounds(), r.load_arrays(), r.num_steps))
    env_id, frame_spec, space = parts[0][:3]
    for path, (other_env, other_spec, other_space, *_) in zip(paths, parts):
        if (other_env, other_spec, other_space) != (env_id, frame_spec, space):
            raise ValueError(f"{path} holds {other_env} rollouts ({other_spec}, {other_space}); {paths[0]} holds "
                             f"{env_id} ({frame_spec}, {space}): train on stores of one env and preprocessing")
    offsets = np.cumsum([0] + [p[5] for p in parts])
    return RolloutData(
        env_id=env_id, frame_spec=frame_spec, action_space=space,
        bounds=np.concatenate([p[3] + off for p, off in zip(parts, offsets)]),
        arrays={k: np.concatenate([p[4][k] for p in parts]) for k in parts[0][4] if all(k in p[4] for p in parts)},
        frames=read_frames(paths, np.arange(offsets[-1])) if with_frames else None,
    )


def encode_store(vae: ConvVAE, path: str | Path, chunk_steps: int = 16384) -> tuple[np.ndarray, np.ndarray]:
    """V's (mu, logvar) of every frame of one store, reading a chunk at a time so that its frames are never all in
    memory."""
    mus, logvars = [], []
    with open_rollouts(path) as r:
        for start in range(0, r.num_steps, chunk_steps):
            mu, logvar = encode_frames(vae, r.load_frames(np.arange(start, min(start + chunk_steps, r.num_steps))))
            mus.append(mu)
            logvars.append(logvar)
    return np.concatenate(mus), np.concatenate(logvars)


def vae_digest(vae: ConvVAE) -> str:
    """Hex sha256 of V's weights: which V a cache of latents came from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(vae.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def cached_latents(vae: ConvVAE, paths: Sequence[str | Path], cache: Path,
                   frames: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """V's (mu, logvar) of every frame of the stores, in load_rollout_data's order, cached per store in `cache`.

    A store's latents are keyed by its resolved path, its step count and V's weights, so a run given one more store
    (each round of the iterative procedure) encodes only that store, and a grown store or another V encodes afresh.
    frames: the stores' frames if already in memory (V was trained on them), else they are read from disk.
    """
    cache.mkdir(parents=True, exist_ok=True)
    weights = vae_digest(vae)
    mus, logvars, offset = [], [], 0
    for path in paths:
        with open_rollouts(path) as r:
            steps = r.num_steps
        key = hashlib.sha256(f"{Path(path).resolve()}|{steps}|{weights}".encode()).hexdigest()[:16]
        file = cache / f"{key}.safetensors"
        if file.is_file():
            stored = load_numpy(str(file))
            mu, logvar = stored["mu"], stored["logvar"]
        else:
            mu, logvar = encode_frames(vae, frames[offset:offset + steps]) if frames is not None else encode_store(vae, path)
            partial = file.with_suffix(".partial")
            save_numpy({"mu": mu, "logvar": logvar}, str(partial))
            partial.replace(file)  # an interrupted write leaves no cache entry behind
        mus.append(mu)
        logvars.append(logvar)
        offset += steps
    return np.concatenate(mus), np.concatenate(logvars)


def read_frames(paths: Sequence[str | Path], index: np.ndarray, chunk_steps: int = 16384) -> np.ndarray:
    """The frames at ascending step indices of load_rollout_data's concatenation of the stores, read from disk a
    chunk at a time into one array (so reading them all needs their memory once, not twice)."""
    index = np.asarray(index, dtype=np.int64)
    if np.any(np.diff(index) < 0):
        raise ValueError("read_frames needs ascending indices")
    frames, done, offset = None, 0, 0
    for path in paths:
        with open_rollouts(path) as r:
            mine = index[(index >= offset) & (index < offset + r.num_steps)] - offset
            if frames is None:
                empty = r.load_frames(mine[:0])
                frames = np.empty((len(index), *empty.shape[1:]), dtype=empty.dtype)
            for start in range(0, len(mine), chunk_steps):
                chunk = r.load_frames(mine[start:start + chunk_steps])
                frames[done:done + len(chunk)] = chunk
                done += len(chunk)
            offset += r.num_steps
    if len(index) and index[-1] >= offset:
        raise IndexError(f"step index {index[-1]} is past the {offset} steps of the stores")
    return frames


def bundle_with_vae(bundle: str | Path, env_id: str, frame_spec: Any) -> WorldModel:
    """A V + M bundle whose V is to encode frames of env_id and frame_spec; ValueError naming the problem otherwise."""
    base = load_world_model(bundle)
    if base.vae is None:
        raise ValueError(f"{bundle} is an RSSM bundle, which has no V: pass a V + M bundle")
    if (base.env_id, base.frame_spec) != (env_id, frame_spec):
        raise ValueError(f"{bundle} sees {base.env_id} frames ({base.frame_spec}); the rollouts are {env_id} ({frame_spec})")
    return base


def train_world_model(
    rollouts_path: str | Path | Sequence[str | Path],
    out: str | Path,
    config: TrainConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    vae_from: str | Path | None = None,
    mdnrnn_from: str | Path | None = None,
    vae_init_from: str | Path | None = None,
) -> WorldModel:
    """Rollouts -> V -> latents -> M -> bundle at `out`; rerunning the same call resumes where it stopped.

    rollouts_path may list several stores of one env. vae_from: a bundle whose V is reused instead of
    training one (the iterative procedure retrains M on new data, seen through the same V). mdnrnn_from:
    a bundle whose M is the starting point (fine-tuning), which needs the same V (vae_from). vae_init_from: a
    bundle whose V is the starting point of V's training (config.vae.epochs more epochs on these frames).
    """
    if vae_init_from is not None and vae_from is not None:
        raise ValueError("vae_from reuses a V as it is and vae_init_from trains one on from it: pass one of them")
    if mdnrnn_from is not None and vae_from is None:
        raise ValueError("mdnrnn_from fine-tunes an M on its V's latents: pass vae_from too (usually the same bundle's V)")
    config = config or TrainConfig()
    paths = [rollouts_path] if isinstance(rollouts_path, (str, Path)) else list(rollouts_path)
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    work.mkdir(parents=True, exist_ok=True)
    (work / "config.json").write_text(json.dumps(dataclasses.asdict(config), indent=2))
    data = load_rollout_data(paths, with_frames=vae_from is None)  # a trained V reads the frames from disk
    bounds, arrays, frames, space = data.bounds, data.arrays, data.frames, data.action_space
    env_id, frame_spec = data.env_id, data.frame_spec
    train_ids, heldout_ids = split_episode_ids(len(bounds), config.holdout_fraction, config.seed)
    train_index = np.concatenate([np.arange(*bounds[i]) for i in train_ids])
    heldout_index = np.concatenate([np.arange(*bounds[i]) for i in heldout_ids]) if len(heldout_ids) else np.zeros(0, int)

    def base_vae(bundle: str | Path) -> ConvVAE:
        return bundle_with_vae(bundle, env_id, frame_spec).vae

    if vae_from is None:
        init = base_vae(vae_init_from) if vae_init_from is not None else None
        vae = train_vae(frames, config.vae, work / "vae", config.seed, progress, index=train_index, init=init)
    else:
        vae = base_vae(vae_from)
    mu, logvar = cached_latents(vae, paths, work / "latents", frames)
    heldout_frames = frames[heldout_index] if frames is not None else read_frames(paths, heldout_index)
    vae_metrics = vae_heldout_loss(vae, heldout_frames, config.vae.kl_tolerance)
    del frames, data, heldout_frames

    def encode(actions: np.ndarray) -> np.ndarray:
        return encode_action_array(space, actions)

    train_eps = episode_data(bounds, train_ids, mu, logvar, arrays, encode)
    heldout_eps = episode_data(bounds, heldout_ids, mu, logvar, arrays, encode)
    init = load_world_model(mdnrnn_from).mdnrnn if mdnrnn_from is not None else None
    mdnrnn, pos_weight = train_mdnrnn(train_eps, config.mdnrnn, work / "mdnrnn", config.seed, progress, init)
    m_metrics = mdnrnn_heldout_metrics(mdnrnn, heldout_eps, config.mdnrnn)

    first = bounds[train_ids, 0][: config.initial_states]
    recipe = dataclasses.asdict(config)
    if vae_from is not None:
        recipe["vae_from"] = str(vae_from)
    if mdnrnn_from is not None:
        recipe["mdnrnn_from"] = str(mdnrnn_from)
    if vae_init_from is not None:
        recipe["vae_init_from"] = str(vae_init_from)
    model = WorldModel(
        vae=vae, mdnrnn=mdnrnn, initial_z=torch.from_numpy(mu[first]).clone(), env_id=env_id,
        action_space=space, frame_spec=frame_spec, max_episode_steps=make_source_env_limit(env_id),
        default_temperature=config.default_temperature,
        info={
            "data": data_summary(paths, bounds, arrays["rewards"], train_ids, heldout_ids),
            "heldout": {"vae": vae_metrics, "mdnrnn": m_metrics},
            "done_pos_weight": pos_weight,
            "recipe": recipe,
        },
    )
    model.save(out)
    return model


def make_source_env_limit(env_id: str) -> int:
    """The episode limit of the real env (its TimeLimit), as the dream's max_episode_steps."""
    env = make_source_env(env_id)
    try:
        return int(env.spec.max_episode_steps or 1000)
    finally:
        env.close()
