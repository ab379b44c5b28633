"""The RSSM world model: the model's math, training, the bundle, and every bundle consumer (Dream/Real/vector envs,
SB3 adapter, CMA-ES, evaluate, dream GIF, info, collect with a controller, pipeline and iterate) on tiny RSSM bundles."""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import DependencyNotInstalled
from gymnasium.utils.env_checker import check_env
from PIL import Image
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from torch.nn import functional as F

import dreamenv
import dreamenv.train_rssm
from dreamenv.agents.actor_critic import ActorCriticConfig, train_actor_critic
from dreamenv.agents.controller import dream_returns, load_controller, train_controller
from dreamenv.cli import main
from dreamenv.data.preprocess import preprocess_frame
from dreamenv.data.collect import collect
from dreamenv.data.dataset import EpisodeData, open_rollouts, sequence_batches
from dreamenv.envs.dream import DreamEnv, dream_core
from dreamenv.envs.real import RealEnv
from dreamenv.envs.vector import DreamVectorEnv
from dreamenv.fidelity import FidelityConfig, fidelity, plot_fidelity, trained_episodes
from dreamenv.models.rssm import (
    RSSM, RSSMConfig, categorical_kl, mode_one_hot, sample_categorical, symexp, symlog, unimix_log_probs,
)
from dreamenv.models.vae import frames_to_tensor
from dreamenv.train import encode_action_array, load_rollout_data, terminal_balance, train_world_model
from dreamenv.train_rssm import (
    RSSMTrainConfig, episode_returns, filtered_deter, rssm_losses, train_rssm, train_rssm_world_model,
)
from dreamenv.worldmodel import BundleError, WorldModel, read_manifest
from tests.conftest import Tiny, assert_differentiable_step_is_the_dream_step, tiny_cmaes_config, tiny_recipe
from tests.tiny_envs import MODULE, PIXELS_ID


def tiny_rssm_config(epochs: int = 2) -> RSSMConfig:
    """The smallest useful RSSM: GRU 16, 4 latents of 4 classes, CNN depth 4."""
    return RSSMConfig(deter=16, hidden=16, stoch=4, classes=4, cnn_depth=4, seq_len=16, batch_size=8, epochs=epochs,
                      learning_rate=1e-3)


OBS_DIM = 16 + 4 * 4  # concat(h, z)


@dataclass(frozen=True)
class TinyRSSM:
    """An RSSM bundle (+ its work dir and a CMA-ES controller) trained on a tiny pipeline's rollouts."""

    base: Tiny
    bundle: Path
    work: Path
    controller: Path


def _build(base: Tiny, root: Path) -> TinyRSSM:
    bundle = root / "bundle"
    train_rssm_world_model(base.rollouts, bundle, RSSMTrainConfig(rssm=tiny_rssm_config()), progress=False)
    controller = root / "controller"
    train_controller(bundle, controller, tiny_cmaes_config(), progress=False)
    return TinyRSSM(base, bundle, root / "bundle.work", controller)


@pytest.fixture(scope="session")
def rssm_discrete(tiny_discrete: Tiny, tmp_path_factory: pytest.TempPathFactory) -> TinyRSSM:
    return _build(tiny_discrete, tmp_path_factory.mktemp("rssm_discrete"))


@pytest.fixture(scope="session")
def rssm_box(tiny_box: Tiny, tmp_path_factory: pytest.TempPathFactory) -> TinyRSSM:
    return _build(tiny_box, tmp_path_factory.mktemp("rssm_box"))


@pytest.fixture(scope="session", params=["discrete", "box"])
def rssm(request: pytest.FixtureRequest) -> TinyRSSM:
    """Each tiny RSSM bundle in turn (Discrete and Box actions)."""
    return request.getfixturevalue(f"rssm_{request.param}")


def _actions(space: gym.Space, n: int, seed: int = 0) -> list:
    space = gym.spaces.Discrete(space.n, start=space.start) if isinstance(space, gym.spaces.Discrete) else \
        gym.spaces.Box(space.low, space.high, space.shape, space.dtype)
    space.seed(seed)
    return [space.sample() for _ in range(n)]


# --- the model --------------------------------------------------------------------------------------------------

def test_shapes_and_distributions() -> None:
    torch.manual_seed(0)
    config = tiny_rssm_config()
    model = RSSM(config, action_dim=3)
    frames = torch.rand(5, 3, 64, 64)
    embed = model.encode(frames)
    assert embed.shape == (5, model.encoder.out_dim) == (5, 8 * 4 * 16)
    deter = model.initial_deter(5)
    post = model.posterior(deter, embed)
    assert post.shape == (5, 4, 4)
    torch.testing.assert_close(post.exp().sum(-1), torch.ones(5, 4))
    assert post.exp().min() >= config.unimix / config.classes - 1e-7  # unimix: no class below 1% / classes
    stoch = mode_one_hot(post).flatten(1)
    assert stoch.shape == (5, 16) and torch.equal(stoch.view(5, 4, 4).sum(-1), torch.ones(5, 4))
    deter2 = model.recur(deter, stoch, torch.eye(3)[[0, 1, 2, 0, 1]])
    assert deter2.shape == (5, 16) and not torch.equal(deter2, deter)
    feat = model.feature(deter2, stoch)
    assert feat.shape == (5, model.feat_dim) == (5, OBS_DIM)
    assert model.decode(feat).shape == (5, 3, 64, 64)
    assert model.reward(feat).shape == (5,) and model.continue_logit(feat).shape == (5,)
    torch.testing.assert_close(model.reward(feat), torch.zeros(5))  # DreamerV3: the reward output starts at zero


def test_symlog_and_kl() -> None:
    x = torch.tensor([-1000.0, -3.0, -0.5, 0.0, 0.5, 3.0, 1000.0])
    torch.testing.assert_close(symexp(symlog(x)), x)
    assert symlog(torch.tensor(1000.0)) < 7.0  # large rewards are squashed
    p = unimix_log_probs(torch.randn(2, 4, 4), 0.01)
    q = unimix_log_probs(torch.randn(2, 4, 4), 0.01)
    assert torch.all(categorical_kl(p, q) > 0) and torch.allclose(categorical_kl(p, p), torch.zeros(2), atol=1e-6)


def test_temperature_changes_sampling() -> None:
    """logits / tau: tau 0 is the mode whatever the noise; the mode's frequency falls as tau grows."""
    gen = torch.Generator().manual_seed(0)
    log_probs = unimix_log_probs(torch.tensor([[[2.0, 1.0, 0.0, -1.0]]]).expand(4000, 1, 4), 0.0)
    uniform = torch.rand(4000, 1, generator=gen)
    mode = mode_one_hot(log_probs)
    assert torch.equal(sample_categorical(log_probs, 0.0, uniform), mode)
    frequency = {tau: (sample_categorical(log_probs, tau, uniform) * mode).sum().item() / 4000 for tau in (0.5, 1.0, 3.0)}
    expected = {tau: math.exp(2 / tau) / sum(math.exp(v / tau) for v in (2, 1, 0, -1)) for tau in frequency}
    for tau in frequency:
        assert frequency[tau] == pytest.approx(expected[tau], abs=0.03)  # 4000 draws: std < 0.008
    assert frequency[0.5] > frequency[1.0] > frequency[3.0]
    per_env = sample_categorical(log_probs[:2], torch.tensor([0.0, 50.0]), torch.full((2, 1), 0.99))
    assert per_env[0].argmax() == 0 and per_env[1].argmax() == 3  # one tau per env


def _sequence_episodes(tiny: Tiny) -> tuple[Any, np.ndarray, list[EpisodeData]]:
    """A tiny store loaded as the RSSM trainer sees it: the data, encoded actions, one EpisodeData per episode."""
    data = load_rollout_data([tiny.rollouts])
    actions = encode_action_array(data.action_space, data.arrays["actions"])
    episodes = [EpisodeData(None, None, actions[s:e], data.arrays["rewards"][s:e].astype(np.float32),
                            data.arrays["terminated"][s:e].astype(np.float32), frame_index=np.arange(s, e))
                for s, e in data.bounds]
    return data, actions, episodes


def test_training_lowers_the_loss(tiny_discrete: Tiny, tmp_path: Path) -> None:
    data, actions, episodes = _sequence_episodes(tiny_discrete)
    config = tiny_rssm_config(epochs=6)

    def loss(model: RSSM) -> dict[str, float]:
        totals = {"loss": 0.0, "image": 0.0, "reward": 0.0}
        with torch.no_grad():
            for batch in sequence_batches(episodes, config.seq_len, config.batch_size, np.random.default_rng(0)):
                out = rssm_losses(model, batch, data.frames, sample=False)
                for key in totals:
                    totals[key] += out[key].item()
        return totals

    torch.manual_seed(0)
    before = loss(RSSM(config, actions.shape[1]).eval())
    after = loss(train_rssm(episodes, data.frames, config, tmp_path / "ckpt", seed=0, progress=False))
    assert after["loss"] < 0.8 * before["loss"], (before, after)
    assert after["image"] < before["image"] and after["reward"] < before["reward"]


def test_terminal_weight_scales_the_continue_loss_of_terminal_steps(tiny_discrete: Tiny) -> None:
    """terminal_weight w adds (w - 1) x the terminal steps' cross-entropy (-log p(continue = 0)) to the continue loss."""
    data, actions, episodes = _sequence_episodes(tiny_discrete)
    torch.manual_seed(0)
    model = RSSM(tiny_rssm_config(), actions.shape[1]).eval()
    batch = next(b for b in sequence_batches(episodes, 8, 64, np.random.default_rng(0)) if (b["dones"] * b["step_mask"]).sum() > 0)
    with torch.no_grad():
        plain = rssm_losses(model, batch, data.frames, sample=False)
        model.config = dataclasses.replace(model.config, terminal_weight=5.0)
        weighted = rssm_losses(model, batch, data.frames, sample=False)
    terminal = batch["dones"] * batch["step_mask"]
    extra = 4.0 * (F.softplus(plain["continue_logit"]) * terminal).sum() / batch["step_mask"].sum()
    assert extra > 0 and torch.isclose(weighted["continue"], plain["continue"] + extra, rtol=1e-5)
    assert torch.isclose(weighted["image"], plain["image"]) and torch.isclose(weighted["reward"], plain["reward"])


def test_a_balanced_terminal_weight_leaves_p_continue_calibrated(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """"balanced" weighs the rare terminal steps as much as all others; the trained head is shifted back by log(w), so
    the mean p(done) over the training steps is near the real rate, where the weighted logits overrate it."""
    data, actions, episodes = _sequence_episodes(tiny_discrete)
    weight = terminal_balance(episodes)
    assert weight > 5  # terminal steps are rare in the tiny rollouts
    config = dataclasses.replace(tiny_rssm_config(epochs=6), terminal_weight="balanced")
    model = train_rssm(episodes, data.frames, config, tmp_path / "ckpt", seed=0, progress=False)
    assert model.config.terminal_weight == pytest.approx(weight)
    logits, dones, masks = [], [], []
    with torch.no_grad():
        for batch in sequence_batches(episodes, config.seq_len, config.batch_size, np.random.default_rng(0)):
            logits.append(rssm_losses(model, batch, data.frames, sample=False)["continue_logit"].flatten())
            dones.append(batch["dones"].flatten())
            masks.append(batch["step_mask"].flatten())
    logit, done, mask = torch.cat(logits), torch.cat(dones), torch.cat(masks).bool()
    rate = done[mask].mean().item()
    calibrated = torch.sigmoid(-logit[mask]).mean().item()
    weighted = torch.sigmoid(-(logit[mask] - math.log(weight))).mean().item()  # the head as trained, before the shift
    assert abs(math.log(calibrated / rate)) < math.log(2) < abs(math.log(weighted / rate))


def test_a_continue_head_on_h_alone(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """continue_input "deter": p(continue) reads h only (never the prior z of an episode's last step), trains, and the
    fused dream step ends episodes by the same head."""
    config = dataclasses.replace(tiny_rssm_config(epochs=1), continue_input="deter")
    train_rssm_world_model(tiny_discrete.rollouts, tmp_path / "bundle", RSSMTrainConfig(rssm=config), progress=False)
    wm = WorldModel.load(tmp_path / "bundle")
    model = wm.rssm
    assert model.config.continue_input == "deter"
    g = torch.Generator().manual_seed(0)
    deter = torch.randn(6, 16, generator=g)
    one, other = (F.one_hot(torch.randint(0, 4, (6, 4), generator=g), 4).flatten(1).float() for _ in range(2))
    logit = model.continue_logit(model.feature(deter, one))
    torch.testing.assert_close(logit, model.continue_logit(model.feature(deter, other)), rtol=0, atol=0)
    assert logit.std() > 0  # h matters
    assert model.reward(model.feature(deter, one)).ne(model.reward(model.feature(deter, other))).any()  # reward reads z
    core = dream_core(wm)
    state = core.initial_state(np.arange(6) % len(wm.initial_z))
    actions = wm.encode_actions(np.asarray(_actions(wm.action_space, 6), dtype=np.int64))
    noise = core.draw_noise(np.random.default_rng(0), 6)
    after, _, _ = core.step(state, actions, 1.0, noise, "threshold", 0.5)
    p_done = core.done_probability(after)
    for margin, expected in ((-1e-4, True), (1e-4, False)):  # the fused step's p(done) is the head's, per env
        ends = [core.step(state, actions, 1.0, noise, "threshold", float(p + margin))[2][i] for i, p in enumerate(p_done)]
        assert all(end == expected for end in ends)
    with pytest.raises(ValueError, match="continue_input"):
        RSSMConfig(continue_input="z")


def test_a_continue_head_refit_on_frozen_h(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """continue_refit_epochs trains the continue head alone, after the joint training, on whole-episode h: its weighted
    loss falls there, every other weight is the jointly trained one, and a finished run refits without retraining."""
    data, actions, episodes = _sequence_episodes(tiny_discrete)
    config = dataclasses.replace(tiny_rssm_config(epochs=1), continue_input="deter", terminal_weight="balanced")
    joint = train_rssm(episodes, data.frames, config, tmp_path / "ckpt", seed=0, progress=False)
    written = (tmp_path / "ckpt" / "model.safetensors").stat().st_mtime_ns
    refit = train_rssm(episodes, data.frames, dataclasses.replace(config, continue_refit_epochs=200), tmp_path / "ckpt",
                       seed=0, progress=False)
    assert (tmp_path / "ckpt" / "model.safetensors").stat().st_mtime_ns == written  # resumed as finished: no training
    for (name, before), after in zip(joint.state_dict().items(), refit.state_dict().values()):
        if name.startswith("continue_head"):
            continue
        torch.testing.assert_close(after, before, rtol=0, atol=0, msg=name)
    deter, dones = filtered_deter(joint, episodes, data.frames)
    assert deter.shape == (sum(len(e.actions) for e in episodes), 16)
    assert dones.sum() == sum(float(e.terminated.sum()) for e in episodes) > 0

    def weighted_loss(model: RSSM) -> float:
        w = model.config.terminal_weight
        with torch.no_grad():  # the trained (weighted) logits: the calibration shifted them by log(w)
            logit = model.continue_head(deter).squeeze(-1) - math.log(w)
            return (F.binary_cross_entropy_with_logits(logit, 1 - dones, reduction="none") * (1 + (w - 1) * dones)).mean().item()

    assert weighted_loss(refit) < 0.9 * weighted_loss(joint)
    with pytest.raises(ValueError, match="continue_refit_epochs"):
        RSSMConfig(continue_refit_epochs=3)  # on [h, z]
    with pytest.raises(ValueError, match="continue_refit_epochs"):
        RSSMConfig(continue_input="deter", continue_refit_epochs=-1)


# --- the bundle -------------------------------------------------------------------------------------------------

def _outputs(wm: WorldModel) -> list[torch.Tensor]:
    """Everything the RSSM computes, on fixed inputs."""
    g = torch.Generator().manual_seed(0)
    frames = torch.rand(3, 3, 64, 64, generator=g)
    model = wm.rssm
    with torch.no_grad():
        embed = model.encode(frames)
        deter = model.recur(model.initial_deter(3), wm.initial_z[:3], torch.rand(3, wm.action_dim, generator=g))
        feat = model.feature(deter, wm.initial_z[:3])
        return [embed, deter, model.prior(deter), model.posterior(deter, embed), model.decode(feat),
                model.reward(feat), model.continue_logit(feat), wm.initial_z]


def test_an_rssm_through_a_trained_v(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--vae-from: the RSSM reads V's mean z and predicts it, V stays as it was, and the dream draws through V."""
    source = WorldModel.load(tiny_discrete.bundle)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[train.rssm]\nhidden = 16\nbatch_size = 8\nlearning_rate = 1e-3\n")
    assert main(["train", str(tiny_discrete.rollouts), "--model", "rssm", "--vae-from", str(tiny_discrete.bundle),
                 "--out", str(tmp_path / "b"), "--config", str(recipe), "--hidden-size", "16", "--stoch", "4",
                 "--classes", "4", "--rssm-epochs", "6", "--seq-len", "16"]) == 0
    capsys.readouterr()
    wm = WorldModel.load(tmp_path / "b")
    model = wm.rssm
    assert model.config.vae_z_dim == source.z_dim and model.encoder is None and wm.vae is None
    for name, tensor in source.vae.state_dict().items():
        assert torch.equal(model.vae.state_dict()[name], tensor), name
    info = read_manifest(tmp_path / "b")["info"]
    assert info["vae_from"]["fingerprint"] == source.fingerprint
    assert info["recipe"]["rssm"]["vae_z_dim"] == source.z_dim

    data, actions, episodes = _sequence_episodes(tiny_discrete)
    frames = frames_to_tensor(data.frames[:7])
    with torch.no_grad():
        torch.testing.assert_close(model.encode(frames), source.vae.encode(frames)[0])
        feat = model.feature(model.initial_deter(7), mode_one_hot(model.posterior(model.initial_deter(7),
                                                                                   model.encode(frames))).flatten(1))
        assert model.reconstruct(feat).shape == (7, source.z_dim)
        torch.testing.assert_close(model.decode(feat), source.vae.decode(model.reconstruct(feat)))

    latents = source.vae.encode(frames_to_tensor(data.frames))[0].detach().numpy()

    def z_error(trained: RSSM) -> float:
        with torch.no_grad():
            return sum(rssm_losses(trained, batch, latents, sample=False)["image"].item()
                       for batch in sequence_batches(episodes, 16, 8, np.random.default_rng(0)))
    fresh = RSSM(model.config, actions.shape[1]).eval()
    fresh.vae.load_state_dict(source.vae.state_dict())
    assert z_error(model) < 0.5 * z_error(fresh)

    dream = DreamEnv(tmp_path / "b", render_mode="rgb_array")
    _checks(lambda: DreamEnv(tmp_path / "b"))
    dream.reset(seed=0)
    dream.step(dream.action_space.sample())
    assert dream.render().shape == (64, 64, 3)
    real = RealEnv(tmp_path / "b")
    assert real.observation_space == dream.observation_space
    real.close()
    assert main(["info", str(tmp_path / "b")]) == 0
    out = capsys.readouterr().out
    assert f"frames seen through V z {source.z_dim} of {tiny_discrete.bundle}" in out and "sum sq. error of V's z" in out


def test_an_rssm_through_v_refuses_what_does_not_fit(tiny_discrete: Tiny, tiny_box: Tiny, rssm_discrete: TinyRSSM,
                                                     tmp_path: Path) -> None:
    config = RSSMTrainConfig(rssm=tiny_rssm_config(epochs=1))
    with pytest.raises(ValueError, match="has no V"):
        train_rssm_world_model(tiny_discrete.rollouts, tmp_path / "a", config, progress=False, vae_from=rssm_discrete.bundle)
    with pytest.raises(ValueError, match="has no V"):  # the same check for an M trained through a bundle's V
        train_world_model(tiny_discrete.rollouts, tmp_path / "m", vae_from=rssm_discrete.bundle, progress=False)
    with pytest.raises(ValueError, match="--vae-from"):
        train_rssm_world_model(tiny_discrete.rollouts, tmp_path / "b", RSSMTrainConfig(rssm=dataclasses.replace(
            tiny_rssm_config(), vae_z_dim=8)), progress=False)
    with pytest.raises(ValueError, match="sees .*TinyPixelsBox.* frames.*the rollouts are"):
        train_rssm_world_model(tiny_discrete.rollouts, tmp_path / "c", config, progress=False, vae_from=tiny_box.bundle)
    with pytest.raises(ValueError, match="vae_z_dim"):
        RSSMConfig(vae_z_dim=-1)
    data, _, episodes = _sequence_episodes(tiny_discrete)
    with pytest.raises(ValueError, match="vae_z_dim is 8 but no V was given"):
        train_rssm(episodes, data.frames, dataclasses.replace(tiny_rssm_config(), vae_z_dim=8), tmp_path / "d")
    source = WorldModel.load(tiny_discrete.bundle).vae
    latents = source.encode(frames_to_tensor(data.frames))[0].detach().numpy()
    through_v = dataclasses.replace(tiny_rssm_config(epochs=1), vae_z_dim=source.z_dim)
    train_rssm(episodes, latents, through_v, tmp_path / "e", progress=False, vae=source)
    other = copy.deepcopy(source)
    with torch.no_grad():
        next(other.parameters()).add_(0.01)
    with pytest.raises(ValueError, match="another V than the one given"):  # resuming must not swap in the old V
        train_rssm(episodes, latents, dataclasses.replace(through_v, epochs=2), tmp_path / "e", progress=False, vae=other)


def test_bundle_round_trip(rssm: TinyRSSM, tmp_path: Path) -> None:
    wm = WorldModel.load(rssm.bundle)
    assert wm.model_kind == "rssm" and wm.vae is None and wm.mdnrnn is None
    again = WorldModel.load(wm.save(tmp_path / "again"))
    for a, b in zip(_outputs(wm), _outputs(again)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert again.rssm.config == wm.rssm.config == tiny_rssm_config()
    assert again.fingerprint == wm.fingerprint and again.action_space == wm.action_space == gym.make(rssm.base.env_id).action_space
    assert (again.z_dim, again.hidden_size, again.latent_obs_dim) == (16, 16, OBS_DIM)
    manifest = read_manifest(rssm.bundle)
    assert manifest["model_kind"] == "rssm" and manifest["rssm"]["stoch"] == 4 and manifest["rssm"]["deter"] == 16
    assert set(manifest["files"]) == {p.name for p in rssm.bundle.iterdir()} - {"manifest.json"} \
        == {"rssm.safetensors", "initial_states.safetensors"}
    bank = wm.initial_z.view(-1, 4, 4)
    assert torch.equal(bank.sum(-1), torch.ones(bank.shape[:2]))  # first-frame posterior modes, one-hot
    held = manifest["info"]["heldout"]["rssm"]
    assert held["episodes"] >= 1 and np.isfinite(held["reconstruction"]) and held["kl"] >= 0
    assert held["reward_mae"] ** 2 <= held["reward_mse"] + 1e-9
    assert manifest["info"]["recipe"]["model"] == "rssm" and manifest["info"]["data"]["episodes"] == 12
    assert "return_correlation" in held and held["return_mae"] >= 0


def test_teacher_forced_episode_returns(rssm: TinyRSSM) -> None:
    """The held-out return measure sums the reward head's predictions over whole filtered episodes, as the loss makes them."""
    data, _, episodes = _sequence_episodes(rssm.base)
    model = WorldModel.load(rssm.bundle).rssm
    real, predicted = episode_returns(model, episodes, data.frames)
    np.testing.assert_allclose(sorted(real), sorted(float(e.rewards.sum()) for e in episodes), rtol=1e-5)
    one_by_one = []
    with torch.no_grad():
        for episode in episodes:
            batch = next(sequence_batches([episode], len(episode.actions), 1, np.random.default_rng(0)))
            one_by_one.append(float(symexp(rssm_losses(model, batch, data.frames, sample=False)["reward_pred"]).sum()))
    np.testing.assert_allclose(sorted(predicted), sorted(one_by_one), rtol=1e-4, atol=1e-4)


def test_bundle_errors(rssm_discrete: TinyRSSM, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(rssm_discrete.bundle, tmp_path / "b"))
    weights = copy / "rssm.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"rssm\.safetensors.*sha256"):
        WorldModel.load(copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["model_kind"] = "transformer"
    (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="'transformer' world model.*mdnrnn, rssm"):
        WorldModel.load(copy)
    wm = WorldModel.load(rssm_discrete.bundle)
    with pytest.raises(ValueError, match="latent_filter"):
        wm.encode_frames(np.zeros((1, 64, 64, 3), np.uint8))
    mdn = WorldModel.load(rssm_discrete.base.bundle)
    with pytest.raises(ValueError, match="either vae and mdnrnn, or rssm"):
        WorldModel(mdn.vae, mdn.mdnrnn, wm.initial_z, wm.env_id, wm.action_space, wm.frame_spec, 20, rssm=wm.rssm)


def test_bad_configs_name_the_setting() -> None:
    for bad, field in [({"stoch": 0}, "stoch"), ({"classes": 1}, "classes"), ({"unimix": 1.0}, "unimix"),
                       ({"free_nats": -1.0}, "free_nats"), ({"terminal_weight": -2.0}, "terminal_weight"), ({"terminal_weight": "more"}, "terminal_weight"), ({"deter": 2.5}, "deter"),
                       ({"learning_rate": float("nan")}, "learning_rate")]:
        with pytest.raises(ValueError, match=field):
            RSSMConfig(**bad)
    with pytest.raises(ValueError, match=r"unknown RSSM settings \['z_dim'\]"):
        RSSMConfig.from_dict({"z_dim": 32})
    with pytest.raises(ValueError, match=r"\['mdnrnn', 'vae'\] do not apply to an RSSM"):
        RSSMTrainConfig.from_dict({"vae": {}, "mdnrnn": {}, "rssm": {"stoch": 8}})
    assert RSSMTrainConfig.from_dict({"seed": 3, "rssm": {"stoch": 8}}).rssm.stoch == 8


def test_training_resumes_instead_of_restarting(rssm_discrete: TinyRSSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    work = Path(shutil.copytree(rssm_discrete.work, tmp_path / "work"))
    assert json.loads((work / "rssm" / "state.json").read_text())["progress"] == {"epoch": 2, "batch": 0}
    calls, batches_per_epoch = [], []
    real_losses, real_count = dreamenv.train_rssm.rssm_losses, dreamenv.train_rssm.count_batches

    def counting(model, batch, frames, sample=True):
        calls.append(sample)
        return real_losses(model, batch, frames, sample)

    def count_batches(episodes, config):
        batches_per_epoch.append(real_count(episodes, config))
        return batches_per_epoch[-1]

    monkeypatch.setattr(dreamenv.train_rssm, "rssm_losses", counting)
    monkeypatch.setattr(dreamenv.train_rssm, "count_batches", count_batches)
    config = RSSMTrainConfig(rssm=tiny_rssm_config())
    train_rssm_world_model(rssm_discrete.base.rollouts, tmp_path / "bundle", config, work_dir=work, progress=False)
    assert calls and not any(calls)  # only the held-out evaluation ran (modes), no training step
    assert read_manifest(tmp_path / "bundle")["files"] == read_manifest(rssm_discrete.bundle)["files"]
    calls.clear()
    config = RSSMTrainConfig(rssm=tiny_rssm_config(epochs=3))  # one more epoch: trains that epoch only
    train_rssm_world_model(rssm_discrete.base.rollouts, tmp_path / "bundle3", config, work_dir=work, progress=False)
    assert sum(calls) == batches_per_epoch[-1] >= 2  # training steps of one epoch (sample=True), then held-out ones
    assert json.loads((work / "rssm" / "state.json").read_text())["progress"] == {"epoch": 3, "batch": 0}


# --- the envs ---------------------------------------------------------------------------------------------------

def _checks(env_factory) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for check in (check_env, lambda env: sb3_check_env(env, warn=False)):
            env = env_factory()
            try:
                check(env)
            finally:
                env.close()


@pytest.mark.parametrize("obs_mode", ["latent", "pixels"])
def test_dream_and_real_pass_the_checkers_and_share_spaces(rssm: TinyRSSM, obs_mode: str) -> None:
    for cls in (DreamEnv, RealEnv):
        _checks(lambda: cls(rssm.bundle, obs_mode=obs_mode, render_mode="rgb_array"))
    dream = DreamEnv(rssm.bundle, obs_mode=obs_mode, render_mode="rgb_array")
    real = RealEnv(rssm.bundle, obs_mode=obs_mode, render_mode="rgb_array")
    assert dream.observation_space == real.observation_space
    assert dream.action_space == real.action_space == gym.make(rssm.base.env_id).action_space
    assert dream.observation_space.shape == ((OBS_DIM,) if obs_mode == "latent" else (64, 64, 3))
    dream.reset(seed=0)
    assert dream.render().shape == (64, 64, 3)
    real.close()


def _expected_prior_mode(wm: WorldModel, obs: np.ndarray, action) -> tuple[np.ndarray, np.ndarray, float]:
    model = wm.rssm
    deter, stoch = torch.from_numpy(obs[None, :16]), torch.from_numpy(obs[None, 16:])
    with torch.no_grad():
        deter2 = model.recur(deter, stoch, wm.encode_actions(np.asarray(action)[None]))
        mode = mode_one_hot(model.prior(deter2)).flatten(1)
        reward = model.reward(model.feature(deter2, mode))
    return deter2[0].numpy(), mode[0].numpy(), float(reward[0])


def test_dream_step_order_and_temperature(rssm: TinyRSSM) -> None:
    """h' = GRU(h, [z, a]); z' ~ prior(h') / tau: at tau 0 the prior's mode; at tau 1 samples that vary by seed."""
    env = DreamEnv(rssm.bundle, temperature=0.0, done_mode="threshold", done_threshold=1.0)
    action = _actions(env.action_space, 1)[0]
    for seed in range(3):
        obs, _ = env.reset(seed=seed)
        deter, mode, reward = _expected_prior_mode(env.world_model, obs, action)
        obs2, r, *_ = env.step(action)
        np.testing.assert_allclose(obs2[:16], deter, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(obs2[16:], mode)
        assert r == pytest.approx(reward, abs=1e-6)
    differs = 0
    for seed in range(20):
        obs, _ = env.reset(seed=seed, options={"temperature": 1.0})
        deter, mode, _ = _expected_prior_mode(env.world_model, obs, action)
        obs2, *_ = env.step(action)
        np.testing.assert_allclose(obs2[:16], deter, rtol=1e-5, atol=1e-6)  # h' does not depend on tau
        differs += not np.array_equal(obs2[16:], mode)
    assert differs >= 3  # 20 draws of 4 latents from a tiny model's prior: mostly not all at their mode


def test_seeding(rssm: TinyRSSM) -> None:
    def rollout(env: DreamEnv, seed: int) -> list[np.ndarray]:
        obs, _ = env.reset(seed=seed)
        trace = [obs]
        for action in _actions(env.action_space, 15):
            obs, reward, terminated, _, _ = env.step(action)
            trace.append(np.append(obs, [reward, terminated]))
            if terminated:
                break
        return trace

    env, other = DreamEnv(rssm.bundle, temperature=1.0), DreamEnv(rssm.bundle, temperature=1.0)
    first = rollout(env, 7)
    assert all(np.array_equal(a, b) for a, b in zip(first, rollout(other, 7))) and len(first) == len(rollout(other, 7))
    seeds_differ = [not (len(first) == len(t) and all(np.array_equal(a, b) for a, b in zip(first, t)))
                    for t in (rollout(env, s) for s in range(8, 12))]
    assert any(seeds_differ)


def _fixed_continue(bundle: Path, done_probability: float) -> WorldModel:
    """A private copy of the world model whose continue head always says 1 - done_probability."""
    wm = WorldModel.load(bundle)
    with torch.no_grad():
        wm.rssm.continue_head[-1].weight.zero_()
        wm.rssm.continue_head[-1].bias.fill_(math.log((1 - done_probability) / done_probability))
    return wm


def test_termination_from_the_continue_head(rssm_discrete: TinyRSSM) -> None:
    wm = _fixed_continue(rssm_discrete.bundle, 0.3)

    def rate(env: DreamEnv, steps: int) -> float:
        env.reset(seed=0)
        ends = 0
        for action in _actions(env.action_space, steps):
            terminated = env.step(action)[2]
            if terminated:
                ends += 1
                env.reset()
        return ends / steps

    assert rate(DreamEnv(wm, done_mode="threshold"), 50) == 0.0  # p(done) 0.3 < 0.5
    assert rate(DreamEnv(wm, done_mode="threshold", done_threshold=0.25), 20) == 1.0
    assert 0.22 < rate(DreamEnv(wm, done_mode="sample"), 600) < 0.38  # Bernoulli(0.3): 600 draws, std 0.019
    returns, lengths = dream_returns(wm, lambda obs, rows: np.zeros(len(rows), np.int64), 400, 1.0,
                                     np.random.default_rng(0), max_steps=50)
    assert lengths.mean() == pytest.approx(1 / 0.3, rel=0.15)  # geometric episode lengths, mean 1 / p


def test_real_env_is_the_posterior_filter(rssm: TinyRSSM) -> None:
    """RealEnv: z_t = mode of q(z | h_t, frame_t); h_{t+1} = GRU(h_t, [z_t, a_t]); reward and flags from the game."""
    real = RealEnv(rssm.bundle)
    game = gym.make(rssm.base.env_id)
    wm = real.world_model
    model = wm.rssm

    def posterior_mode(deter: torch.Tensor, image: np.ndarray) -> torch.Tensor:
        frame = preprocess_frame(image, wm.frame_spec)[None]
        return mode_one_hot(model.posterior(deter, model.encode(frames_to_tensor(frame)))).flatten(1)

    obs, _ = real.reset(seed=3)
    image, _ = game.reset(seed=3)
    with torch.no_grad():
        deter = model.initial_deter(1)
        stoch = posterior_mode(deter, image)
        np.testing.assert_allclose(obs, torch.cat([deter, stoch], -1)[0].numpy(), atol=1e-6)
        for action in _actions(real.action_space, 40, seed=1):
            obs, reward, terminated, truncated, _ = real.step(action)
            image, game_reward, game_terminated, game_truncated, _ = game.step(action)
            deter = model.recur(deter, stoch, wm.encode_actions(np.asarray(action)[None]))
            stoch = posterior_mode(deter, image)
            np.testing.assert_allclose(obs, torch.cat([deter, stoch], -1)[0].numpy(), rtol=1e-4, atol=1e-5)
            assert (reward, terminated, truncated) == (game_reward, game_terminated, game_truncated)
            if terminated or truncated:
                break
    assert terminated or truncated
    real.close()


def test_vector_equals_single_envs(rssm: TinyRSSM) -> None:
    temperatures, limit = [0.5, 1.0, 1.3], 10
    vec = DreamVectorEnv(3, rssm.bundle, temperature=temperatures, max_episode_steps=limit, autoreset_mode="SameStep")
    singles = [gym.wrappers.TimeLimit(DreamEnv(rssm.bundle, temperature=t), limit) for t in temperatures]
    obs, _ = vec.reset(seed=11)
    np.testing.assert_allclose(obs, np.stack([e.reset(seed=11 + i)[0] for i, e in enumerate(singles)]), atol=1e-6)
    rng = np.random.default_rng(0)
    ends = 0
    for _ in range(40):
        actions = np.stack([_actions(vec.single_action_space, 1, seed=int(rng.integers(1 << 30)))[0] for _ in range(3)])
        obs, rewards, terminated, truncated, infos = vec.step(actions)
        for i, env in enumerate(singles):
            expected, reward, term, trunc, _ = env.step(actions[i])
            if term or trunc:
                np.testing.assert_allclose(infos["final_obs"][i], expected, atol=1e-5)
                expected = env.reset()[0]
            np.testing.assert_allclose(obs[i], expected, atol=1e-5)
            assert rewards[i] == pytest.approx(reward, abs=1e-5) and (terminated[i], truncated[i]) == (term, trunc)
        ends += int(np.sum(terminated | truncated))
    assert ends >= 3


def test_registered_ids_make_and_make_vec(rssm_box: TinyRSSM) -> None:
    dream_id, real_id = dreamenv.register_bundle(rssm_box.bundle, "TinyRSSMBox")
    try:
        dream, real = gym.make(dream_id, temperature=0.7), gym.make(real_id)
        assert dream.unwrapped.temperature == 0.7 and dream.observation_space == real.observation_space
        vec = gym.make_vec(dream_id, num_envs=4)
        assert isinstance(vec.unwrapped, DreamVectorEnv) and vec.reset(seed=0)[0].shape == (4, OBS_DIM)
        real.close()
    finally:
        for env_id in (dream_id, real_id):
            gym.registry.pop(env_id, None)


def test_bad_actions_raise(rssm_discrete: TinyRSSM, rssm_box: TinyRSSM) -> None:
    dream, real = DreamEnv(rssm_discrete.bundle), RealEnv(rssm_box.bundle)
    with pytest.raises(gym.error.ResetNeeded):
        dream.step(0)
    dream.reset(seed=0)
    real.reset(seed=0)
    with pytest.raises(ValueError, match=r"outside.*\[0, 2\]"):
        dream.step(3)
    with pytest.raises(ValueError, match="NaN"):
        real.step(np.array([np.nan, 0.0], np.float32))
    vec = DreamVectorEnv(2, rssm_box.bundle)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="shape"):
        vec.step(np.zeros((3, 2), np.float32))
    real.close()


def test_sb3_adapter_and_ppo(rssm_box: TinyRSSM) -> None:
    from stable_baselines3 import PPO

    venv = dreamenv.sb3_vec_env(str(rssm_box.bundle), n_envs=4, max_episode_steps=8)
    assert venv.reset().shape == (4, OBS_DIM)
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, seed=0, device="cpu")
    model.learn(128)
    assert model.num_timesteps >= 128
    real = dreamenv.make_real(rssm_box.bundle)
    action, _ = model.predict(real.reset(seed=0)[0], deterministic=True)
    assert real.step(np.clip(action, -1, 1).astype(np.float32))[0].shape == (OBS_DIM,)
    real.close()


# --- CMA-ES, evaluate, dream, info, collect -------------------------------------------------------------------

@pytest.mark.parametrize("done_mode", ["sample", "expected"])
def test_the_actor_critic_trains_in_an_rssm_dream(rssm_discrete: TinyRSSM, tmp_path: Path, done_mode: str) -> None:
    """REINFORCE from real starts of the bundle's rollouts, with drawn or expected ends (a regression: the done-critic
    code once read an MDN-RNN state's z from every dream)."""
    config = ActorCriticConfig(iterations=3, batch=8, horizon=5, hidden=16, layers=1, done_mode=done_mode,
                               real_start_episodes=4)
    policy = train_actor_critic(rssm_discrete.bundle, tmp_path / "ac", config, progress=False)
    info = json.loads((tmp_path / "ac" / "agent.json").read_text())
    assert info["starts"] == "real" and info["iterations"] == 3
    assert all(math.isfinite(h["imagined_reward"]) for h in info["history"])
    obs, _ = dreamenv.make_dream_vec(rssm_discrete.bundle, 4).reset(seed=0)
    assert policy.predict(obs, deterministic=True)[0].shape == (4,)


def test_the_dynamics_gradient_through_the_rssm(rssm_box: TinyRSSM, tmp_path: Path) -> None:
    """The autograd step gives RSSMDreamCore.step's next state, reward and p(done) from the same state, actions,
    temperatures and noise, passes the gradient straight through the drawn classes to the actions, and the
    actor-critic trains with it."""
    # through the drawn classes alone (straight through)
    assert_differentiable_step_is_the_dream_step(rssm_box.bundle, lambda state, reward: state.stoch.sum())

    config = ActorCriticConfig(iterations=4, batch=8, horizon=5, hidden=16, layers=1, actor_gradient="dynamics",
                               done_mode="expected", real_starts=False)
    policy = train_actor_critic(rssm_box.bundle, tmp_path / "ac", config, progress=False)
    info = json.loads((tmp_path / "ac" / "agent.json").read_text())
    assert info["config"]["actor_gradient"] == "dynamics" and info["iterations"] == 4
    assert all(math.isfinite(h["imagined_reward"]) for h in info["history"])
    obs, _ = dreamenv.make_dream_vec(rssm_box.bundle, 4).reset(seed=0)
    assert policy.predict(obs, deterministic=True)[0].shape == (4, 2)


def test_cmaes_controller_in_the_rssm_dream(rssm: TinyRSSM) -> None:
    ctrl = load_controller(rssm.controller, rssm.bundle)
    assert ctrl.obs_dim == OBS_DIM and ctrl.info["bundle_fingerprint"] == WorldModel.load(rssm.bundle).fingerprint
    with pytest.raises(ValueError, match="another world model"):
        load_controller(rssm.controller, rssm.base.bundle)  # the MDN-RNN bundle of the same env


def test_cli_train_info_evaluate_dream(rssm_discrete: TinyRSSM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = shutil.copytree(rssm_discrete.work, tmp_path / "work")
    argv = ["train", str(rssm_discrete.base.rollouts), "--model", "rssm", "--out", str(tmp_path / "bundle"),
            "--work-dir", str(work), "--hidden-size", "16", "--stoch", "4", "--classes", "4", "--rssm-epochs", "2",
            "--seq-len", "16"]
    config = tmp_path / "recipe.toml"
    config.write_text("[train.rssm]\nhidden = 16\ncnn_depth = 4\nbatch_size = 8\nlearning_rate = 1e-3\n")
    assert main([*argv, "--config", str(config)]) == 0  # resumes the finished run: the same weights
    assert read_manifest(tmp_path / "bundle")["files"] == read_manifest(rssm_discrete.bundle)["files"]
    capsys.readouterr()
    assert main(["train", str(rssm_discrete.base.rollouts), "--model", "rssm", "--out", str(tmp_path / "x"), "--z-dim", "8"]) == 2
    assert "--z-dim set V or M" in capsys.readouterr().err
    assert main(["train", str(rssm_discrete.base.rollouts), "--model", "rssm", "--out", str(tmp_path / "x"),
                 "--vae-init-from", str(rssm_discrete.bundle)]) == 2
    assert "--vae-init-from set V or M" in capsys.readouterr().err

    assert main(["info", str(rssm_discrete.bundle)]) == 0
    out = capsys.readouterr().out
    assert "rssm: GRU 16, 4 x 4 categorical latents, action dim 3" in out and f"({OBS_DIM},)" in out
    assert "RSSM reconstruction" in out and "episode returns (teacher-forced)" in out and "done precision" in out

    result = tmp_path / "result.json"
    argv = ["evaluate", str(rssm_discrete.bundle), "--controller", str(rssm_discrete.controller), "--episodes", "2",
            "--temperatures", "0.5,1.2", "--backend", "serial", "--json", str(result)]
    assert main(argv) == 0
    scores = json.loads(result.read_text())
    assert set(scores["virtual"]) == {"0.5", "1.2"} and scores["actual"]["episodes"] == 2

    gif = tmp_path / "dream.gif"
    argv = ["dream", str(rssm_discrete.bundle), "--controller", str(rssm_discrete.controller), "--out", str(gif), "--steps", "4"]
    assert main(argv) == 0
    with Image.open(gif) as image:
        assert image.format == "GIF" and 2 <= image.n_frames <= 5


def test_latent_cell_needs_an_mdnrnn(rssm_discrete: TinyRSSM) -> None:
    for make in (lambda: DreamEnv(rssm_discrete.bundle, obs_mode="latent_cell"),
                 lambda: RealEnv(rssm_discrete.bundle, obs_mode="latent_cell"),
                 lambda: DreamVectorEnv(2, rssm_discrete.bundle, obs_mode="latent_cell")):
        with pytest.raises(ValueError, match="needs an MDN-RNN bundle"):
            make()


def test_sampled_encoding_needs_a_vae(rssm_discrete: TinyRSSM) -> None:
    for make in (lambda: RealEnv(rssm_discrete.bundle, encoding="sample"),
                 lambda: dreamenv.compare(lambda obs: 0, rssm_discrete.bundle, episodes=1, encoding="sample")):
        with pytest.raises(ValueError, match="has no V"):
            make()


def test_collect_with_a_controller_of_an_rssm_bundle(rssm_discrete: TinyRSSM, tmp_path: Path) -> None:
    out = collect(f"{MODULE}:{rssm_discrete.base.env_id}", tmp_path / "ctrl.h5", 2, policy="controller",
                  controller=str(rssm_discrete.controller), bundle=str(rssm_discrete.bundle), backend="serial", progress=False)
    with open_rollouts(out) as rollouts:
        assert rollouts.num_episodes == 2 and set(np.unique(rollouts.load_arrays()["actions"])) <= {0, 1, 2}


# --- pipeline and iterate -------------------------------------------------------------------------------------

TINY_RSSM_TABLES = """
[train]
model = "rssm"
[train.rssm]
deter = 16
hidden = 16
stoch = 4
classes = 4
cnn_depth = 4
seq_len = 16
batch_size = 8
epochs = 1
"""


def test_pipeline_and_iterate_with_an_rssm(tmp_path: Path) -> None:
    """[train] model = "rssm": pipeline trains an RSSM bundle (on another run's store, given as [run] rollouts), then
    CMA-ES and evaluation as for V + M; iterate retrains the RSSM from scratch on all the data."""
    store = collect(f"{MODULE}:{PIXELS_ID}", tmp_path / "shared" / "rollouts.h5", 6, backend="serial", progress=False)
    shards = {p: p.stat().st_mtime_ns for p in (tmp_path / "shared" / "rollouts.shards").iterdir()}
    recipe = tiny_recipe(tmp_path, 6, run=f'rollouts = "{store}"', train=TINY_RSSM_TABLES,
                         tables='[iterate]\nepisodes = 3\nbackend = "serial"\n')
    assert main(["pipeline", str(recipe)]) == 0
    run = tmp_path / "run"
    assert {p: p.stat().st_mtime_ns for p in shards} == shards and not (run / "rollouts.h5").exists()  # reused, not recollected
    manifest = read_manifest(run / "bundle")
    assert manifest["model_kind"] == "rssm" and manifest["rssm"]["deter"] == 16 and manifest["rssm"]["epochs"] == 1
    assert manifest["info"]["data"]["rollouts"] == [str(store)]
    assert load_controller(run / "controller", run / "bundle").obs_dim == OBS_DIM
    assert json.loads((run / "results.json").read_text())["actual"]["episodes"] == 2
    argv = ["train", str(store), "--out", str(tmp_path / "again"), "--work-dir", str(run / "bundle.work"), "--config", str(recipe)]
    assert main(argv) == 0  # `dreamenv train` takes the model from the recipe: it resumes the finished RSSM run
    assert read_manifest(tmp_path / "again")["files"] == manifest["files"]

    assert main(["iterate", str(recipe), "--rounds", "1"]) == 0
    round_manifest = read_manifest(run / "round1" / "bundle")
    assert round_manifest["model_kind"] == "rssm" and round_manifest["info"]["data"]["episodes"] == 6 + 3
    assert json.loads((run / "round1" / "results.json").read_text())["actual"]["episodes"] == 2


def test_pipeline_refuses_unknown_models_and_rssm_fine_tuning(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tiny_recipe(tmp_path, 6, train=TINY_RSSM_TABLES.replace('"rssm"', '"transformer"'))
    assert main(["pipeline", str(recipe)]) == 2
    assert "[train] model = 'transformer': the allowed values are 'mdnrnn', 'rssm'" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # refused before collecting
    recipe = tiny_recipe(tmp_path, 6, train=TINY_RSSM_TABLES, tables="[iterate]\nwarm_start = true\nmdn_epochs = 1\n")
    assert main(["iterate", str(recipe)]) == 2
    assert "[iterate] warm_start, mdn_epochs: fine-tuning is MDN-RNN only for now" in capsys.readouterr().err


# --- fidelity ---------------------------------------------------------------------------------------------------

def _assert_png(path: Path) -> None:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size[0] > image.size[1] > 200  # panels side by side


def test_fidelity_scores_held_out_episodes(rssm_discrete: TinyRSSM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rollouts, mdn = rssm_discrete.base.rollouts, rssm_discrete.base.bundle
    config = FidelityConfig(horizon=6, stride=2, temperature=0.0)
    result = fidelity([mdn, rssm_discrete.bundle], [rollouts], config, progress=False)
    wm = WorldModel.load(rssm_discrete.bundle)
    trained = trained_episodes(wm, "rssm", [rollouts])
    assert trained == trained_episodes(WorldModel.load(mdn), "mdn", [rollouts])  # same stores, seed and split
    gone = tmp_path / "gone.h5"
    wm.info["data"]["rollouts"] = [str(gone)]  # as a shipped bundle: its stores are elsewhere, none is scored here
    assert trained_episodes(wm, "shipped", [rollouts]) == set()
    held = sorted(i for _, i in {(str(rollouts.resolve()), i) for i in range(12)} - trained)
    assert result["episodes"] == len(held) == 1
    a, b = result["bundles"]
    assert (a["model_kind"], b["model_kind"]) == ("mdnrnn", "rssm") and len(b["latent_mse"]) == 6
    assert all(0 <= v <= 1 for v in b["pixel_mse"] if v is not None) and b["windows_by_horizon"][0] >= 1

    # Horizon 1 at tau 0, recomputed by hand: h' is exact, so the error is the prior's mode against the posterior's.
    data = load_rollout_data([rollouts])
    start, end = data.bounds[held[0]]
    frames = data.frames[start:end]
    model = wm.rssm
    errors = []
    with torch.no_grad():
        deter = model.initial_deter(1)
        for t in range(end - start - 1):
            stoch = mode_one_hot(model.posterior(deter, model.encode(frames_to_tensor(frames[t : t + 1])))).flatten(1)
            deter = model.recur(deter, stoch, wm.encode_actions(data.arrays["actions"][start + t : start + t + 1]))
            predicted = mode_one_hot(model.prior(deter)).flatten(1)
            seen = mode_one_hot(model.posterior(deter, model.encode(frames_to_tensor(frames[t + 1 : t + 2])))).flatten(1)
            if t % 2 == 0:
                errors.append(float((predicted - seen).pow(2).sum()) / OBS_DIM)
    assert b["latent_mse"][0] == pytest.approx(np.mean(errors), abs=1e-6)

    everything = fidelity([mdn, rssm_discrete.bundle], [rollouts], FidelityConfig(horizon=2, all_episodes=True, max_episodes=3),
                          progress=False)
    assert everything["episodes"] == 3

    # The one-step done scores split over spans of the episode: each real step and each true end in the span of its step.
    bounds = data.bounds[:3]
    last_steps = [end - start - 1 for start, end in bounds if data.arrays["terminated"][end - 1]]
    for bundle in everything["bundles"]:
        spans = bundle["done_by_episode_step"]
        edges = spans["edges"]
        assert edges[0] == 0 and edges[-1] == wm.max_episode_steps and 2 <= len(edges) <= 9
        assert spans["steps"] == [sum(max(0, min(end - start, hi) - lo) for start, end in bounds)
                                  for lo, hi in zip(edges[:-1], edges[1:])]
        assert spans["true_ends"] == [sum(lo <= t < hi for t in last_steps) for lo, hi in zip(edges[:-1], edges[1:])]
        assert sum(spans["true_ends"]) == bundle["done_one_step"]["terminal_steps"] > 0
        assert sum(spans["predicted_ends"]) == pytest.approx(
            bundle["done_one_step"]["predicted_dones_per_true"] * bundle["done_one_step"]["terminal_steps"], rel=1e-4)
    out, png = tmp_path / "fidelity.json", tmp_path / "plots" / "fidelity.png"
    argv = ["fidelity", str(mdn), str(rssm_discrete.bundle), str(rollouts), "--horizon", "5", "--stride", "3", "--json", str(out),
            "--plot", str(png)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| horizon | latent MSE A | latent MSE B |" in table and "| 5 |" in table and "(rssm, latent observation 32)" in table
    assert "| episode steps | real steps | true ends | predicted ends A | predicted ends B |" in table
    assert json.loads(out.read_text())["bundles"][1]["model_kind"] == "rssm"
    assert f"wrote {png}" in table
    _assert_png(png)


def test_fidelity_plot(rssm_discrete: TinyRSSM, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = FidelityConfig(horizon=4, stride=2, all_episodes=True, max_episodes=2)
    result = fidelity([rssm_discrete.base.bundle, rssm_discrete.bundle], [rssm_discrete.base.rollouts], config, progress=False)
    result["bundles"][0]["pixel_mse"][-1] = None  # a horizon no window reached is a gap, not an error
    path = plot_fidelity(result, tmp_path / "sub" / "f.png")
    assert path == tmp_path / "sub" / "f.png"
    _assert_png(path)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(DependencyNotInstalled, match='pip install "dreamenv\\[plot\\]"'):
        plot_fidelity(result, tmp_path / "x.png")


def test_fidelity_bad_input(rssm_discrete: TinyRSSM, rssm_box: TinyRSSM, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="compare bundles on rollouts of their env"):
        fidelity([rssm_discrete.bundle, rssm_box.bundle], [rssm_discrete.base.rollouts], progress=False)
    copy = Path(shutil.copytree(rssm_discrete.bundle, tmp_path / "b"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["info"]["data"]["rollouts"] = [str(tmp_path / "gone.h5"), str(rssm_discrete.base.rollouts)]
    (copy / "manifest.json").write_text(json.dumps(manifest))  # the split over both cannot be redrawn without gone.h5
    with pytest.raises(ValueError, match="trained on .*gone.h5, which cannot be read here.*--all-episodes"):
        fidelity([copy, rssm_discrete.bundle], [rssm_discrete.base.rollouts], progress=False)
    with pytest.raises(ValueError, match="horizon"):
        FidelityConfig(horizon=0)
    assert main(["fidelity", str(rssm_discrete.bundle), str(rssm_discrete.bundle), str(tmp_path / "none.h5")]) == 2
    assert "none.h5" in capsys.readouterr().err
