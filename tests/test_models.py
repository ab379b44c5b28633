"""V (ConvVAE), M (MDN-RNN) and the resume checkpoints, on small random models."""
from __future__ import annotations

import math
from pathlib import Path

import gymnasium as gym
import pytest
import torch

from dreamenv.agents.controller import LinearController
from dreamenv.checkpointing import load_checkpoint, save_checkpoint
from dreamenv.models.mdnrnn import MDNRNN, MDNOutput, mdn_nll, sample_mdn
from dreamenv.models.vae import ConvVAE, vae_loss


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- V ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("z_dim", [4, 32])
def test_vae_shapes(z_dim: int) -> None:
    vae = ConvVAE(z_dim)
    x = torch.rand(3, 3, 64, 64)
    recon, mu, logvar = vae(x)
    assert recon.shape == x.shape and mu.shape == logvar.shape == (3, z_dim)
    assert recon.min() >= 0 and recon.max() <= 1  # sigmoid output, a frame in [0, 1]
    assert vae.decode(mu).shape == x.shape


@pytest.mark.parametrize(("z_dim", "published"), [(32, 4_348_547), (64, 4_446_915)])
def test_vae_parameter_count_matches_paper(z_dim: int, published: int) -> None:
    """World Models (2018): CarRacing V (z=32) 4,348,547 parameters; Doom V (z=64) 4,446,915."""
    assert _params(ConvVAE(z_dim)) == published


def test_paper_mdnrnn_and_controller_sizes() -> None:
    """CarRacing M: 422,368 parameters for LSTM 256 + MDN (5 Gaussians, z 32, 3 actions) in TF, whose LSTM has one
    bias vector per gate where PyTorch has two (4 * 256 more); our reward and done heads are extra. C: 867."""
    m = MDNRNN(32, 3, 256, 5)
    core = _params(m.lstm) + _params(m.mdn)
    assert core - 4 * 256 == 422_368
    assert LinearController.num_params(32 + 256, gym.spaces.Box(-1, 1, (3,))) == 867


def test_vae_loss_kl_floor() -> None:
    z_dim, tolerance = 8, 0.5
    x = torch.rand(4, 3, 64, 64)
    zeros = torch.zeros(4, z_dim)
    # KL of the prior itself is 0, below the floor: the floor is reported and has no gradient.
    mu = zeros.clone().requires_grad_()
    loss, rec, kl = vae_loss(x, x, mu, zeros, tolerance)
    assert kl.item() == pytest.approx(tolerance * z_dim)
    assert rec.item() == 0 and loss.item() == pytest.approx(tolerance * z_dim)
    loss.backward()
    assert torch.all(mu.grad == 0)
    # Far above the floor the analytic KL 0.5 * sum(mu^2) is used.
    far = torch.full((4, z_dim), 3.0)
    _, _, kl = vae_loss(x, x, far, zeros, tolerance)
    assert kl.item() == pytest.approx(0.5 * 9.0 * z_dim)
    # Reconstruction: summed squared error per frame, averaged over frames.
    _, rec, _ = vae_loss(torch.zeros_like(x), x, zeros, zeros, tolerance)
    assert rec.item() == pytest.approx(x.pow(2).flatten(1).sum(1).mean().item(), rel=1e-5)


# --- M ---------------------------------------------------------------------------------------------------

def test_mdnrnn_step_equals_forward() -> None:
    torch.manual_seed(0)
    model = MDNRNN(z_dim=5, action_dim=3, hidden_size=12, num_gaussians=4).eval()
    z, a = torch.randn(2, 7, 5), torch.randn(2, 7, 3)
    with torch.no_grad():
        seq, (h_n, c_n) = model(z, a)
        h = c = torch.zeros(2, 12)
        for t in range(7):
            h, c = model.step(z[:, t], a[:, t], h, c)
            step_out = model.heads(h)
            for name, full, one in zip(MDNOutput._fields, seq, step_out):
                torch.testing.assert_close(one, full[:, t], msg=f"{name} at t={t}")
    torch.testing.assert_close(h, h_n[0])
    torch.testing.assert_close(c, c_n[0])
    assert seq.logpi.shape == seq.mu.shape == seq.logsigma.shape == (2, 7, 5, 4)
    assert seq.reward.shape == seq.done_logit.shape == (2, 7)
    torch.testing.assert_close(seq.logpi.exp().sum(-1), torch.ones(2, 7, 5))


def _random_output(shape: tuple[int, ...], k: int, seed: int = 0) -> MDNOutput:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(*shape, k, generator=g) * 2
    logits = logits + torch.nn.functional.one_hot(logits.argmax(-1), k)  # a clear mode: no near-ties
    return MDNOutput(
        logpi=torch.log_softmax(logits, -1),
        mu=torch.randn(*shape, k, generator=g) * 3,
        logsigma=torch.randn(*shape, k, generator=g) * 0.3 - 1.0,
        reward=torch.zeros(shape[:-1]),
        done_logit=torch.zeros(shape[:-1]),
    )


def _mode(out: MDNOutput) -> torch.Tensor:
    """mu of the most likely component, per latent dim."""
    return out.mu.gather(-1, out.logpi.argmax(-1, keepdim=True)).squeeze(-1)


def test_mdn_nll_finite_and_lower_at_the_mean() -> None:
    out = _random_output((6, 4), k=5)
    at_mode = mdn_nll(out, _mode(out))
    far = mdn_nll(out, _mode(out) + 100.0)
    assert at_mode.shape == far.shape == (6,)
    assert torch.isfinite(at_mode).all() and torch.isfinite(far).all()
    assert torch.all(at_mode < far)


def test_mdn_nll_single_gaussian_is_the_gaussian_nll() -> None:
    out = _random_output((3, 2), k=1)
    z = torch.randn(3, 2)
    mu, sigma = out.mu[..., 0], out.logsigma[..., 0].exp()
    expected = -torch.distributions.Normal(mu, sigma).log_prob(z).mean(-1)
    torch.testing.assert_close(mdn_nll(out, z), expected)


@pytest.mark.parametrize("tau", [0.0, 1e-6])
def test_sample_at_zero_temperature_is_the_mode_whatever_the_noise(tau: float) -> None:
    out = _random_output((5, 6), k=5)
    g = torch.Generator().manual_seed(1)
    noises = [
        (torch.rand(5, 6, generator=g), torch.randn(5, 6, generator=g) * 3),
        (torch.zeros(5, 6), torch.full((5, 6), 10.0)),  # lowest possible uniform draw: 0.0
        (torch.full((5, 6), 1.0 - 2**-24), torch.full((5, 6), -10.0)),  # highest float32 draw below 1
    ]
    for uniform, normal in noises:
        tol = {} if tau == 0 else {"atol": 0.05, "rtol": 0}
        torch.testing.assert_close(sample_mdn(out, tau, uniform, normal), _mode(out), **tol)


def test_sample_picks_components_by_weight() -> None:
    """At tau = 1 the component frequencies follow the mixture weights (inverse-CDF on the uniform draw)."""
    logpi = torch.log(torch.tensor([0.0, 0.2, 0.5, 0.3]))
    n = 40_000
    out = MDNOutput(logpi.expand(n, 1, 4), torch.arange(4.0).expand(n, 1, 4), torch.full((n, 1, 4), -20.0),
                    torch.zeros(n), torch.zeros(n))
    uniform = torch.rand(n, 1, generator=torch.Generator().manual_seed(0))
    z = sample_mdn(out, 1.0, uniform, torch.zeros(n, 1)).round().long().flatten()
    freq = torch.bincount(z, minlength=4).float() / n
    torch.testing.assert_close(freq, torch.tensor([0.0, 0.2, 0.5, 0.3]), atol=0.01, rtol=0)


def test_per_env_temperatures_broadcast() -> None:
    out = _random_output((3, 4), k=5)
    g = torch.Generator().manual_seed(2)
    uniform, normal = torch.rand(3, 4, generator=g), torch.randn(3, 4, generator=g)
    taus = torch.tensor([0.0, 1.0, 2.5])
    batched = sample_mdn(out, taus, uniform, normal)
    assert batched.shape == (3, 4)
    for i, tau in enumerate(taus.tolist()):
        single = sample_mdn(out, tau, uniform, normal)
        torch.testing.assert_close(batched[i], single[i])
    torch.testing.assert_close(batched[0], _mode(out)[0])


def test_higher_temperature_larger_spread() -> None:
    n = 20_000
    g = torch.Generator().manual_seed(3)
    uniform, normal = torch.rand(n, 1, generator=g), torch.randn(n, 1, generator=g)
    # One Gaussian: the spread scales exactly with sqrt(tau).
    one = MDNOutput(torch.zeros(n, 1, 1), torch.full((n, 1, 1), 2.0), torch.full((n, 1, 1), math.log(0.5)),
                    torch.zeros(n), torch.zeros(n))
    stds = [sample_mdn(one, tau, uniform, normal).std().item() for tau in (0.25, 1.0, 4.0)]
    assert stds == pytest.approx([0.5 * math.sqrt(t) for t in (0.25, 1.0, 4.0)], rel=0.03)
    # The same mixture for every row (a clear mode): wider at every step up in tau.
    mix = _random_output((1, 1), k=5)
    mix = MDNOutput(*(t.expand(n, *t.shape[1:]) for t in mix))
    spreads = [sample_mdn(mix, tau, uniform, normal).std().item() for tau in (0.0, 0.1, 0.5, 1.0, 1.5)]
    assert spreads[0] < 1e-5  # the mode, up to float rounding
    assert all(a < b for a, b in zip(spreads, spreads[1:])), spreads


# --- resume checkpoints -----------------------------------------------------------------------------------

def _train_steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        z, a = torch.randn(4, 6, 3, generator=g), torch.randn(4, 6, 2, generator=g)
        out, _ = model(z, a)
        loss = mdn_nll(out, torch.randn(4, 6, 3, generator=g)).mean() + out.reward.pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_checkpoint_round_trip_continues_identically(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = MDNRNN(3, 2, 8, 2)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    assert load_checkpoint(tmp_path / "ckpt", model, optimizer) is None
    _train_steps(model, optimizer, 3, seed=1)
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"epoch": 3, "note": "x"})

    torch.manual_seed(99)  # a different init, overwritten by the checkpoint
    restored = MDNRNN(3, 2, 8, 2)
    restored_opt = torch.optim.Adam(restored.parameters(), lr=1e-2)
    assert load_checkpoint(tmp_path / "ckpt", restored, restored_opt) == {"epoch": 3, "note": "x"}

    _train_steps(model, optimizer, 3, seed=2)
    _train_steps(restored, restored_opt, 3, seed=2)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert {p.name for p in (tmp_path / "ckpt").iterdir()} == {"model.safetensors", "optimizer.safetensors", "state.json"}


def test_checkpoint_survives_crash_between_renames(tmp_path: Path) -> None:
    model = MDNRNN(3, 2, 8, 2)
    optimizer = torch.optim.Adam(model.parameters())
    save_checkpoint(tmp_path / "ckpt", model, optimizer, {"epoch": 1})
    (tmp_path / "ckpt").rename(tmp_path / "ckpt.old")  # as if killed after moving the old one away
    restored = MDNRNN(3, 2, 8, 2)
    assert load_checkpoint(tmp_path / "ckpt", restored, torch.optim.Adam(restored.parameters())) == {"epoch": 1}
    torch.testing.assert_close(restored.state_dict(), model.state_dict())


def test_mdnrnn_warm_start(tmp_path: Path) -> None:
    import numpy as np

    from dreamenv.data.dataset import EpisodeData
    from dreamenv.models.mdnrnn import MDNRNNConfig
    from dreamenv.train import train_mdnrnn

    rng = np.random.default_rng(0)
    episodes = [EpisodeData(mu=rng.normal(size=(12, 4)).astype(np.float32), logvar=np.zeros((12, 4), np.float32),
                            actions=np.eye(3, dtype=np.float32)[rng.integers(0, 3, 12)], rewards=np.ones(12, np.float32),
                            terminated=np.eye(12, dtype=np.float32)[-1]) for _ in range(4)]
    config = MDNRNNConfig(hidden_size=8, num_gaussians=2, seq_len=8, batch_size=2, epochs=0)
    start = MDNRNN(4, 3, 8, 2)
    # No epochs: the warm-started M comes back as it went in (the done head's weighting shift undone exactly).
    same, _ = train_mdnrnn(episodes, config, tmp_path / "zero", init=start, progress=False)
    for (name, a), b in zip(start.state_dict().items(), same.state_dict().values()):
        torch.testing.assert_close(a, b, msg=name)
    # Trained from it: it moves away from the start, and differs from a cold start with the same seed.
    config.epochs = 1
    warm, _ = train_mdnrnn(episodes, config, tmp_path / "warm", init=start, progress=False)
    cold, _ = train_mdnrnn(episodes, config, tmp_path / "cold", progress=False)
    assert not torch.equal(warm.lstm.weight_hh_l0, start.lstm.weight_hh_l0)
    assert not torch.equal(warm.lstm.weight_hh_l0, cold.lstm.weight_hh_l0)
    with pytest.raises(ValueError, match="other sizes"):
        train_mdnrnn(episodes, config, tmp_path / "other", init=MDNRNN(4, 3, 16, 2), progress=False)


def test_mdnrnn_learns_from_draws_or_from_means(tmp_path: Path) -> None:
    """sample_latents (the default, the paper's code): M learns from draws of V's posterior, so V's log-variance
    changes what it learns; False: from V's means alone, whatever the log-variance."""
    import numpy as np

    from dreamenv.data.dataset import EpisodeData
    from dreamenv.models.mdnrnn import MDNRNNConfig
    from dreamenv.train import train_mdnrnn

    def episodes(logvar: float) -> list[EpisodeData]:
        rng = np.random.default_rng(0)
        return [EpisodeData(mu=rng.normal(size=(12, 4)).astype(np.float32), logvar=np.full((12, 4), logvar, np.float32),
                            actions=np.eye(3, dtype=np.float32)[rng.integers(0, 3, 12)], rewards=np.ones(12, np.float32),
                            terminated=np.eye(12, dtype=np.float32)[-1]) for _ in range(4)]

    def trained(name: str, logvar: float, sample_latents: bool) -> torch.Tensor:
        config = MDNRNNConfig(hidden_size=8, num_gaussians=2, seq_len=8, batch_size=2, epochs=1, sample_latents=sample_latents)
        torch.manual_seed(0)
        model, _ = train_mdnrnn(episodes(logvar), config, tmp_path / name, progress=False)
        return model.lstm.weight_ih_l0

    torch.testing.assert_close(trained("mean-quiet", -20.0, False), trained("mean-noisy", 0.0, False), rtol=0, atol=0)
    torch.testing.assert_close(trained("draw-quiet", -20.0, True), trained("mean-quiet", -20.0, False))  # sigma ~ 0
    assert not torch.allclose(trained("draw-noisy", 0.0, True), trained("mean-noisy", 0.0, False), atol=1e-4)


def test_done_head_refit_moves_only_the_done_head_and_fits_it(tmp_path: Path) -> None:
    """done_refit_epochs: after M's epochs the done head alone is fitted on whole episodes' h; the rest stays as trained,
    and the head's weighted loss on those h falls."""
    import numpy as np
    from torch.nn import functional as F

    from dreamenv.data.dataset import EpisodeData
    from dreamenv.models.mdnrnn import MDNRNNConfig
    from dreamenv.train import train_mdnrnn, whole_episode_h

    rng = np.random.default_rng(0)
    episodes = []
    for length in (9, 14, 20, 30):
        mu = rng.normal(size=(length, 4)).astype(np.float32)
        mu[-1] += 3.0  # the frame before a death looks different: a head can learn it
        episodes.append(EpisodeData(mu=mu, logvar=np.full((length, 4), -4.0, np.float32),
                                    actions=np.eye(3, dtype=np.float32)[rng.integers(0, 3, length)],
                                    rewards=np.ones(length, np.float32), terminated=np.eye(length, dtype=np.float32)[-1]))

    def trained(name: str, refit: int) -> torch.nn.Module:
        config = MDNRNNConfig(hidden_size=8, num_gaussians=2, seq_len=8, batch_size=2, epochs=1, done_refit_epochs=refit)
        torch.manual_seed(0)
        model, pos_weight = train_mdnrnn(episodes, config, tmp_path / name, progress=False)
        return model, pos_weight, config

    plain, pos_weight, config = trained("plain", 0)
    refit, _, _ = trained("refit", 1000)
    for (name, a), b in zip(plain.state_dict().items(), refit.state_dict().values()):
        if not name.startswith("done_head"):
            torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    assert not torch.equal(plain.done_head.weight, refit.done_head.weight)
    h, dones = whole_episode_h(plain, episodes, config)
    assert h.shape == (sum(len(e.actions) for e in episodes), 8) and dones.sum() == len(episodes)
    with torch.no_grad():  # both heads are calibrated: back to the weighted scale the loss measures
        losses = [F.binary_cross_entropy_with_logits(m.done_head(h).squeeze(-1) + math.log(pos_weight), dones,
                                                     pos_weight=torch.tensor(pos_weight)).item() for m in (plain, refit)]
    assert losses[1] < 0.8 * losses[0]
    with pytest.raises(ValueError, match="done_refit_epochs"):
        MDNRNNConfig(done_refit_epochs=-1)


def test_hit_head_trains_beside_m_resumes_and_stays_out_of_m(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """hit_weight: a training-only head on h learns the hit flags beside M, so M's own weights move with it; its
    checkpoint resumes; the M returned has no hit head; episodes without hit flags are refused."""
    import dataclasses

    import numpy as np
    from safetensors.torch import load_file

    import dreamenv.train
    from dreamenv.data.dataset import EpisodeData
    from dreamenv.models.mdnrnn import MDNRNNConfig
    from dreamenv.train import train_mdnrnn

    rng = np.random.default_rng(0)
    episodes = []
    for length in (9, 14, 20, 30):
        hits = (rng.random(length) < 0.2).astype(np.float32)
        mu = rng.normal(size=(length, 4)).astype(np.float32)
        mu[:, 0] += 3.0 * hits  # the frame before a hit shows it: a head on h can learn it
        episodes.append(EpisodeData(mu=mu, logvar=np.full((length, 4), -4.0, np.float32),
                                    actions=np.eye(3, dtype=np.float32)[rng.integers(0, 3, length)],
                                    rewards=np.ones(length, np.float32), terminated=np.eye(length, dtype=np.float32)[-1],
                                    hits=hits))
    config = MDNRNNConfig(hidden_size=8, num_gaussians=2, seq_len=8, batch_size=2, epochs=1)

    def trained(name: str, hit_weight: float) -> MDNRNN:
        torch.manual_seed(0)
        model, _ = train_mdnrnn(episodes, dataclasses.replace(config, hit_weight=hit_weight), tmp_path / name,
                                progress=False)
        return model

    plain, hit = trained("plain", 0.0), trained("hit", 1.0)
    assert not torch.allclose(plain.lstm.weight_ih_l0, hit.lstm.weight_ih_l0, atol=1e-4)
    assert set(hit.state_dict()) == set(plain.state_dict())  # the bundle's M is the paper's M
    saved = load_file(str(tmp_path / "hit" / "model.safetensors"))
    assert {"hit_head.weight", "hit_head.bias"} <= set(saved)

    def no_training(*args: object, **kwargs: object) -> None:
        raise AssertionError("a finished run trained again")

    monkeypatch.setattr(dreamenv.train, "_mdnrnn_losses", no_training)
    torch.testing.assert_close(trained("hit", 1.0).lstm.weight_ih_l0, hit.lstm.weight_ih_l0, rtol=0, atol=0)
    monkeypatch.undo()
    no_flags = [dataclasses.replace(e, hits=None) for e in episodes]
    with pytest.raises(ValueError, match="hit_weight needs hit flags"):
        train_mdnrnn(no_flags, dataclasses.replace(config, hit_weight=1.0), tmp_path / "none", progress=False)
    with pytest.raises(ValueError, match="hit_weight"):
        MDNRNNConfig(hit_weight=-1.0)
