"""Train the RSSM world model on rollout stores, resumably, and write its bundle (the same format, model_kind "rssm").

Training observations are the stores' frames (uint8), or a trained V's mean latents of them (float32) for an RSSM
that sees through that V (RSSMConfig.vae_z_dim)."""
from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

import numpy as np
import torch
from torch.nn import functional as F
from tqdm.auto import tqdm

from dreamenv.checkpointing import load_checkpoint, save_checkpoint
from dreamenv.data.dataset import EpisodeData, sequence_batches, split_episode_ids
from dreamenv.metrics import DoneScores
from dreamenv.models.rssm import (
    RSSM, RSSMConfig, categorical_kl, mode_one_hot, straight_through_sample, symexp, symlog,
)
from dreamenv.models.vae import ConvVAE, frames_to_tensor
from dreamenv.train import (
    CHECKPOINT_SECONDS, bundle_with_vae, cached_latents, data_summary, encode_action_array, load_rollout_data, make_source_env_limit,
    return_metrics, terminal_balance,
)
from dreamenv.worldmodel import WorldModel


@dataclass
class RSSMTrainConfig:
    """The RSSM recipe: the model and its training (RSSMConfig), how the data is split, the dream's defaults."""

    rssm: RSSMConfig = field(default_factory=RSSMConfig)
    holdout_fraction: float = 0.1
    seed: int = 0
    default_temperature: float = 1.0
    initial_states: int = 1000  # size of the bank of first-frame latents used by reset()

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RSSMTrainConfig":
        """From a recipe's [train] table with an [train.rssm] table; V and M settings are refused, not ignored."""
        data = dict(data)
        rssm = RSSMConfig.from_dict(data.pop("rssm", {}))
        known = {f.name for f in dataclasses.fields(cls)} - {"rssm"}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"settings {unknown} do not apply to an RSSM (its settings: [train.rssm] and {sorted(known)})")
        return cls(rssm=rssm, **data)


class SequencePosteriors(NamedTuple):
    """An observed batch of sequences: states at t = 0..T and the prior/posterior of every step t = 1..T."""

    deter: torch.Tensor  # (B, T + 1, deter)
    stoch: torch.Tensor  # (B, T + 1, stoch * classes)
    posterior: torch.Tensor  # (B, T, stoch, classes) log-probabilities
    prior: torch.Tensor  # (B, T, stoch, classes) log-probabilities


def observation_tensor(observations: np.ndarray) -> torch.Tensor:
    """Training observations as the model takes them: uint8 frames -> float NCHW in [0, 1]; V's latents as they are."""
    return frames_to_tensor(observations) if observations.dtype == np.uint8 else torch.from_numpy(observations)


def batch_observations(observations: np.ndarray, frame_index: torch.Tensor) -> torch.Tensor:
    """Observations at frame_index (B, T + 1) -> (B, T + 1, 3, 64, 64) frames in [0, 1], or (B, T + 1, z) latents."""
    picked = observation_tensor(observations[frame_index.reshape(-1).numpy()])
    return picked.view(*frame_index.shape, *picked.shape[1:])


def observe_sequences(model: RSSM, observations: torch.Tensor, actions: torch.Tensor, next_mask: torch.Tensor,
                      sample: bool) -> SequencePosteriors:
    """Filter observations (B, T + 1, ...: frames, or V's latents) and actions (B, T, a) through the RSSM from h_0 = 0.

    sample: straight-through samples (training) or modes (evaluation, as RealEnv). Where a step has no next
    frame (next_mask 0: an episode's last step), z_{t+1} comes from the prior, as in the dream, without gradient.
    """
    batch, steps = actions.shape[:2]
    pick = straight_through_sample if sample else mode_one_hot
    embed = model.embed(observations.flatten(0, 1)).view(batch, steps + 1, -1)
    deter = model.initial_deter(batch)
    stoch = pick(model.posterior(deter, embed[:, 0])).flatten(1)
    deters, stochs, posteriors, priors = [deter], [stoch], [], []
    for t in range(steps):
        deter = model.recur(deter, stoch, actions[:, t])
        prior, posterior = model.prior(deter), model.posterior(deter, embed[:, t + 1])
        seen = next_mask[:, t, None]
        stoch = seen * pick(posterior).flatten(1) + (1 - seen) * pick(prior).flatten(1).detach()
        deters.append(deter)
        stochs.append(stoch)
        posteriors.append(posterior)
        priors.append(prior)
    return SequencePosteriors(torch.stack(deters, 1), torch.stack(stochs, 1), torch.stack(posteriors, 1), torch.stack(priors, 1))


def weighted_continue_loss(logit: torch.Tensor, dones: torch.Tensor, terminal_weight: float) -> torch.Tensor:
    """Per-step cross-entropy of p(continue) against 1 - done, terminal steps weighted by terminal_weight."""
    return F.binary_cross_entropy_with_logits(logit, 1.0 - dones, reduction="none") * (1.0 + (terminal_weight - 1.0) * dones)


def rssm_losses(model: RSSM, batch: dict[str, torch.Tensor], observations: np.ndarray, sample: bool = True) -> dict[str, torch.Tensor]:
    """DreamerV3's world-model loss on a sequence batch: image (or V's z) + reward (symlog) + continue (terminal steps
    weighted by config.terminal_weight, a number here: train_rssm resolves "balanced") + 0.5 dyn + 0.1 rep KL."""
    config = model.config
    x = batch_observations(observations, batch["frame_index"])
    step_mask, next_mask = batch["step_mask"], batch["next_mask"]
    seq = observe_sequences(model, x, batch["actions"], next_mask, sample)
    feat = model.feature(seq.deter, seq.stoch)
    recon = model.reconstruct(feat.flatten(0, 1)).view_as(x)
    frame_mask = torch.cat([step_mask[:, :1], next_mask], 1)
    image_error = (recon - x).pow(2).sum(tuple(range(2, x.dim())))
    image = (image_error * frame_mask).sum() / frame_mask.sum()
    steps, seen = step_mask.sum(), next_mask.sum().clamp(min=1)
    dyn_kl = categorical_kl(seq.posterior.detach(), seq.prior)
    rep_kl = categorical_kl(seq.posterior, seq.prior.detach())
    dyn = (dyn_kl.clamp(min=config.free_nats) * next_mask).sum() / seen
    rep = (rep_kl.clamp(min=config.free_nats) * next_mask).sum() / seen
    after = feat[:, 1:]
    reward_pred = model.reward_head(after).squeeze(-1)
    reward = ((reward_pred - symlog(batch["rewards"])).pow(2) * step_mask).sum() / steps
    continue_logit = model.continue_logit(after)
    cont = (weighted_continue_loss(continue_logit, batch["dones"], config.terminal_weight) * step_mask).sum() / steps
    total = image + reward + cont + config.dyn_scale * dyn + config.rep_scale * rep
    return {"loss": total, "image": image, "reward": reward, "continue": cont, "kl": (dyn_kl * next_mask).sum() / seen,
            "reward_pred": reward_pred, "continue_logit": continue_logit}


def count_batches(episodes: list[EpisodeData], config: RSSMConfig) -> int:
    """Batches in one pass of sequence_batches over the episodes."""
    pieces = sum(math.ceil(len(e.actions) / config.seq_len) for e in episodes)
    return math.ceil(pieces / config.batch_size)


def train_rssm(
    episodes: list[EpisodeData], observations: np.ndarray, config: RSSMConfig, checkpoint_dir: Path, seed: int = 0,
    progress: bool = True, vae: ConvVAE | None = None,
) -> RSSM:
    """Train the RSSM on episodes (with frame_index into observations), resuming from checkpoint_dir when it holds a run.

    Returns the model with a calibrated continue head: a terminal weight w shifts the trained logits of p(continue)
    by -log(w), which is undone at the end, as for the MDN-RNN's done head; the checkpoint keeps the trained logits.
    config.terminal_weight "balanced" is resolved to the episodes' terminal_balance (the model's config holds the number).
    With config.continue_refit_epochs, the continue head is then refit alone (refit_continue_head); the checkpoint
    keeps the jointly trained model, so adding a refit to a finished run's recipe only runs the refit.
    With config.vae_z_dim, `vae` is the trained V (of that z size) the model sees through, and observations are its
    mean latents of the frames; it stays frozen, and a checkpoint that saw the frames through another V is refused.
    """
    if not episodes or episodes[0].frame_index is None:
        raise ValueError("train_rssm needs at least one training episode with frame_index set")
    if (vae.z_dim if vae is not None else 0) != config.vae_z_dim:
        given = "no V was given" if vae is None else f"the V given has z of {vae.z_dim}"
        raise ValueError(f"RSSMConfig.vae_z_dim is {config.vae_z_dim} but {given}: pass the V the observations were "
                         "encoded with (vae_z_dim 0 trains on frames)")
    if config.terminal_weight == "balanced":
        config = dataclasses.replace(config, terminal_weight=terminal_balance(episodes))
    torch.manual_seed(seed)
    model = RSSM(config, episodes[0].actions.shape[1])
    if vae is not None:
        model.vae.load_state_dict(vae.state_dict())
    trained = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(trained, lr=config.learning_rate, eps=config.adam_eps)
    state = load_checkpoint(checkpoint_dir, model, optimizer) or {"epoch": 0, "batch": 0}
    if vae is not None and any(not torch.equal(tensor, model.vae.state_dict()[name])
                               for name, tensor in vae.state_dict().items()):
        raise ValueError(f"{checkpoint_dir} holds a run that sees the frames through another V than the one given: "
                         "resume with the same --vae-from, or delete that directory to start over with this V")
    n_batches = count_batches(episodes, config)
    bar = tqdm(total=config.epochs * n_batches, initial=state["epoch"] * n_batches + state["batch"],
               desc="train RSSM", unit="batch", disable=not progress)
    last_save = time.monotonic()
    model.train()
    for epoch in range(state["epoch"], config.epochs):
        first = state["batch"] if epoch == state["epoch"] else 0
        batches = sequence_batches(episodes, config.seq_len, config.batch_size, np.random.default_rng(seed + epoch))
        for number, batch in enumerate(batches):
            if number < first:  # done before the checkpoint; the order is a function of the seed alone
                continue
            losses = rssm_losses(model, batch, observations)
            optimizer.zero_grad(set_to_none=True)
            losses["loss"].backward()
            torch.nn.utils.clip_grad_norm_(trained, config.grad_clip)
            optimizer.step()
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, image=f"{losses['image'].item():.1f}", kl=f"{losses['kl'].item():.2f}",
                            reward=f"{losses['reward'].item():.3f}", cont=f"{losses['continue'].item():.3f}")
            if time.monotonic() - last_save > CHECKPOINT_SECONDS:
                save_checkpoint(checkpoint_dir, model, optimizer, {"epoch": epoch, "batch": number + 1})
                last_save = time.monotonic()
        save_checkpoint(checkpoint_dir, model, optimizer, {"epoch": epoch + 1, "batch": 0})
    bar.close()
    model.eval()
    if config.continue_refit_epochs:
        refit_continue_head(model, episodes, observations, seed, progress)
    with torch.no_grad():
        model.continue_head[-1].bias += math.log(config.terminal_weight)
    return model


REFIT_BATCH = 1024  # steps per update of the continue-head refit
REFIT_LEARNING_RATE = 1e-3


def filtered_episodes(model: RSSM, episodes: list[EpisodeData], observations: np.ndarray,
                      batch_size: int = 4) -> Iterator[tuple[SequencePosteriors, dict[str, torch.Tensor]]]:
    """Whole episodes, a few at a time, filtered through the posterior's modes from h_0 = 0 as RealEnv does: each
    batch's states and the batch itself."""
    longest = max(len(e.actions) for e in episodes)
    for batch in sequence_batches(episodes, longest, batch_size, np.random.default_rng(0)):
        yield observe_sequences(model, batch_observations(observations, batch["frame_index"]), batch["actions"],
                                batch["next_mask"], sample=False), batch


@torch.no_grad()
def filtered_deter(model: RSSM, episodes: list[EpisodeData], observations: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """h after every step of whole episodes (filtered_episodes) and each step's done flag: (steps, deter), (steps,)."""
    deters, dones = [], []
    for seq, batch in filtered_episodes(model, episodes, observations):
        keep = batch["step_mask"].bool()
        deters.append(seq.deter[:, 1:][keep])
        dones.append(batch["dones"][keep])
    return torch.cat(deters), torch.cat(dones)


@torch.no_grad()
def episode_returns(model: RSSM, episodes: list[EpisodeData], observations: np.ndarray) -> tuple[list[float], list[float]]:
    """Real and predicted (teacher-forced: the reward head after each step of the filtered episode) episode returns,
    the measure `dreamenv info` gives for M too: can the dream rank good play above bad?"""
    real, predicted = [], []
    for seq, batch in filtered_episodes(model, episodes, observations):
        step_mask = batch["step_mask"]
        rewards = symexp(model.reward_head(model.feature(seq.deter, seq.stoch)[:, 1:]).squeeze(-1))
        real += (batch["rewards"] * step_mask).sum(1).tolist()
        predicted += (rewards * step_mask).sum(1).tolist()
    return real, predicted


def refit_continue_head(model: RSSM, episodes: list[EpisodeData], observations: np.ndarray, seed: int = 0,
                        progress: bool = True) -> None:
    """Train the continue head alone for config.continue_refit_epochs on the frozen model's whole-episode h, with the
    joint loss's terminal weight (its logits stay in that weighted scale, which train_rssm then calibrates)."""
    config = model.config
    deter, dones = filtered_deter(model, episodes, observations)
    optimizer = torch.optim.Adam(model.continue_head.parameters(), lr=REFIT_LEARNING_RATE)
    generator = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(config.continue_refit_epochs), desc="refit continue head", unit="epoch", disable=not progress):
        for rows in torch.randperm(len(dones), generator=generator).split(REFIT_BATCH):
            logit = model.continue_head(deter[rows]).squeeze(-1)
            loss = weighted_continue_loss(logit, dones[rows], config.terminal_weight).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()


@torch.inference_mode()
def rssm_heldout_metrics(model: RSSM, episodes: list[EpisodeData], observations: np.ndarray) -> dict[str, Any]:
    """Held-out one-step quality through the posterior filter (modes, as RealEnv): image error, KL[q || p],
    reward error in real units, done precision/recall (done = 1 - p(continue)), and how well the teacher-forced
    episode returns follow the real ones."""
    if not episodes:
        return {}
    config = model.config
    image_sum = frames_seen = kl_sum = kl_n = rew_sq = rew_abs = steps = 0.0
    done = DoneScores()
    for batch in sequence_batches(episodes, config.seq_len, config.batch_size, np.random.default_rng(0)):
        losses = rssm_losses(model, batch, observations, sample=False)
        step_mask, next_mask = batch["step_mask"], batch["next_mask"]
        frame_mask = torch.cat([step_mask[:, :1], next_mask], 1)
        image_sum += losses["image"].item() * frame_mask.sum().item()
        frames_seen += frame_mask.sum().item()
        kl_sum += losses["kl"].item() * next_mask.sum().item()
        kl_n += next_mask.sum().item()
        err = (symexp(losses["reward_pred"]) - batch["rewards"]) * step_mask
        rew_sq += err.pow(2).sum().item()
        rew_abs += err.abs().sum().item()
        steps += step_mask.sum().item()
        done.add(torch.sigmoid(-losses["continue_logit"]), batch["dones"], step_mask)
    return {
        "reconstruction": image_sum / frames_seen,
        "kl": kl_sum / max(kl_n, 1),
        "reward_mse": rew_sq / steps,
        "reward_mae": rew_abs / steps,
        **done.metrics(),
        **return_metrics(*episode_returns(model, episodes, observations)),
        "steps": steps,
        "episodes": len(episodes),
    }


@torch.inference_mode()
def first_frame_latents(model: RSSM, observations: np.ndarray, batch_size: int = 256) -> torch.Tensor:
    """The posterior's mode at h_0 = 0 for each first observation: the dream's initial-state bank (K, stoch * classes)."""
    parts = []
    for start in range(0, len(observations), batch_size):
        embed = model.embed(observation_tensor(observations[start : start + batch_size]))
        parts.append(mode_one_hot(model.posterior(model.initial_deter(len(embed)), embed)).flatten(1))
    return torch.cat(parts)


def train_rssm_world_model(
    rollouts_path: str | Path | Sequence[str | Path],
    out: str | Path,
    config: RSSMTrainConfig | None = None,
    work_dir: str | Path | None = None,
    progress: bool = True,
    vae_from: str | Path | None = None,
) -> WorldModel:
    """Rollouts -> RSSM -> bundle at `out` (model_kind "rssm"); rerunning the same call resumes where it stopped.

    vae_from: a V + M bundle whose trained V the RSSM sees the frames through (sets config.rssm.vae_z_dim), so that
    it learns the dynamics alone, on the same latents as that bundle's M; the frames are encoded once and cached.
    """
    config = config or RSSMTrainConfig()
    paths = [rollouts_path] if isinstance(rollouts_path, (str, Path)) else list(rollouts_path)
    out = Path(out)
    work = Path(work_dir) if work_dir else out.with_name(out.name + ".work")
    if vae_from is None and config.rssm.vae_z_dim:
        raise ValueError(f"vae_z_dim = {config.rssm.vae_z_dim} sees the frames through a trained V: name its bundle "
                         "with --vae-from BUNDLE (vae_from=), or drop vae_z_dim for the RSSM's own CNN")
    data = load_rollout_data(paths, with_frames=vae_from is None)  # through a V, its latents are all the RSSM reads
    vae, vae_info = None, {}
    if vae_from is not None:
        source = bundle_with_vae(vae_from, data.env_id, data.frame_spec)
        vae, vae_info = source.vae, {"vae_from": {"bundle": str(vae_from), "fingerprint": source.fingerprint}}
        if config.rssm.vae_z_dim not in (0, vae.z_dim):
            raise ValueError(f"the recipe sets vae_z_dim = {config.rssm.vae_z_dim} but {vae_from}'s V has z of "
                             f"{vae.z_dim}: drop vae_z_dim (--vae-from sets it)")
        config = dataclasses.replace(config, rssm=dataclasses.replace(config.rssm, vae_z_dim=vae.z_dim))
    work.mkdir(parents=True, exist_ok=True)
    recipe = {"model": "rssm", **dataclasses.asdict(config)}
    (work / "config.json").write_text(json.dumps(recipe, indent=2))
    observations = data.frames if vae is None else cached_latents(vae, paths, work / "latents")[0]
    bounds, arrays = data.bounds, data.arrays
    train_ids, heldout_ids = split_episode_ids(len(bounds), config.holdout_fraction, config.seed)
    actions = encode_action_array(data.action_space, arrays["actions"])

    def episodes(ids: np.ndarray) -> list[EpisodeData]:
        return [EpisodeData(None, None, actions[s:e], arrays["rewards"][s:e].astype(np.float32),
                            arrays["terminated"][s:e].astype(np.float32), frame_index=np.arange(s, e))
                for s, e in (bounds[i] for i in ids)]

    model = train_rssm(episodes(train_ids), observations, config.rssm, work / "rssm", config.seed, progress, vae)
    metrics = rssm_heldout_metrics(model, episodes(heldout_ids), observations)
    first = bounds[train_ids, 0][: config.initial_states]
    world_model = WorldModel(
        vae=None, mdnrnn=None, rssm=model, initial_z=first_frame_latents(model, observations[first]),
        env_id=data.env_id, action_space=data.action_space, frame_spec=data.frame_spec,
        max_episode_steps=make_source_env_limit(data.env_id), default_temperature=config.default_temperature,
        info={
            "data": data_summary(paths, bounds, arrays["rewards"], train_ids, heldout_ids),
            "heldout": {"rssm": metrics},
            "recipe": recipe,
            **vae_info,
        },
    )
    world_model.save(out)
    return world_model
