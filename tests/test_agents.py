"""Agents trained in the dream: `dreamenv train-agent` (SB3 PPO, the Dreamer-style actor-critic, CMA-ES), saved, resumed, scored."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from stable_baselines3 import PPO

import dreamenv
from dreamenv.agents.actor_critic import ActorCriticConfig, ActorCriticPolicy, lambda_returns, train_actor_critic
from dreamenv.agents.controller import LinearController
from dreamenv.agents.saved import load_agent
from dreamenv.agents.sb3 import PPOConfig, train_ppo
from dreamenv.cli import main
from dreamenv.compare import load_policy
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny


def _ppo_recipe(tmp_path: Path) -> Path:
    """Small PPO updates (2 dreams x 32 steps), a checkpoint every 64 steps."""
    recipe = tmp_path / "ppo.toml"
    recipe.write_text("[ppo]\nn_steps = 32\nbatch_size = 32\ncheckpoint_every = 64\n")
    return recipe


def test_train_agent_ppo_saves_resumes_and_scores(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = str(tiny_discrete.bundle), tmp_path / "ppo"
    common = ["train-agent", bundle, "--algo", "ppo", "--out", str(out), "--config", str(_ppo_recipe(tmp_path)),
              "--n-envs", "2", "--temperature", "0.7"]
    argv = [*common, "--timesteps", "100"]
    assert main(argv) == 0
    assert f"agent: {out}" in capsys.readouterr().out
    info = json.loads((out / "agent.json").read_text())
    wm = WorldModel.load(tiny_discrete.bundle)
    assert info["algo"] == "ppo" and info["env_id"] == wm.env_id and info["bundle_fingerprint"] == wm.fingerprint
    assert info["temperature"] == 0.7 and info["config"]["n_envs"] == 2 and info["timesteps"] == 128  # 2 updates of 64
    model = load_policy(out, bundle=bundle)
    assert isinstance(model, PPO) and model.num_timesteps == 128 and model.n_envs == 2
    assert model.observation_space == dreamenv.make_dream(bundle).observation_space

    # Rerun with the same budget: nothing left to do, nothing rewritten. With more: it continues from 128.
    before = (out / "model.zip").read_bytes()
    assert main(argv) == 0 and (out / "model.zip").read_bytes() == before
    assert main([*common, "--timesteps", "192"]) == 0
    assert json.loads((out / "agent.json").read_text())["timesteps"] == 192 and load_agent(out).num_timesteps == 192

    # The trained model runs unchanged in the real game, and the harness scores it from its directory.
    real = dreamenv.make_real(bundle)
    obs, _ = real.reset(seed=0)
    action, _ = model.predict(obs, deterministic=True)
    real.step(action)
    capsys.readouterr()
    assert main(["compare", bundle, "--policy", str(out), "--episodes", "2", "--backend", "serial", "--temperatures", "0.7"]) == 0
    assert f"policy {out}" in capsys.readouterr().out


def test_agents_are_tied_to_their_bundle(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    out = tmp_path / "ppo"
    config = PPOConfig(timesteps=1, n_envs=2, n_steps=16, batch_size=16)
    train_ppo(tiny_discrete.bundle, out, config, progress=False)
    with pytest.raises(ValueError, match="another world model"):
        load_policy(out, bundle=tiny_box.bundle)
    with pytest.raises(ValueError, match="another world model"):  # resuming into another bundle's agent
        train_ppo(tiny_box.bundle, out, config, progress=False)
    with pytest.raises(ValueError, match="holds a ppo agent, not sac"):
        load_policy(out, algo="sac")
    zip_model = load_policy(out / "model.zip", algo="ppo")  # SB3's own zip, loaded by the algorithm that saved it
    obs = np.zeros((3, zip_model.observation_space.shape[0]), np.float32)
    np.testing.assert_array_equal(zip_model.predict(obs, deterministic=True)[0], load_agent(out).predict(obs, deterministic=True)[0])


def test_ppo_config_errors(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="unknown PPO settings \\['n_step'\\]"):
        PPOConfig.from_dict({"n_step": 32})
    with pytest.raises(ValueError, match="timesteps must be >= 1"):
        PPOConfig(timesteps=0)
    recipe = tmp_path / "bad.toml"
    recipe.write_text("[ppo]\nlearning_rat = 0.1\n")
    argv = ["train-agent", str(tiny_discrete.bundle), "--algo", "ppo", "--out", str(tmp_path / "x"), "--config", str(recipe)]
    assert main(argv) == 2
    assert "learning_rat" in capsys.readouterr().err


def test_train_agent_cmaes_is_the_controller(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "c.toml"
    recipe.write_text("[controller]\npopulation = 4\nrollouts = 1\ngenerations = 1\nmax_steps = 10\n")
    out = tmp_path / "c"
    argv = ["train-agent", str(tiny_discrete.bundle), "--algo", "cmaes", "--out", str(out), "--config", str(recipe),
            "--temperature", "0.9"]
    assert main(argv) == 0
    controller = load_policy(out, bundle=tiny_discrete.bundle)
    assert isinstance(controller, LinearController) and controller.info["temperature"] == 0.9
    assert main([*argv, "--timesteps", "10"]) == 2
    assert "PPO and actor-critic options" in capsys.readouterr().err


# --- the Dreamer-style actor-critic ---------------------------------------------------------------------------

def _reference_lambda_returns(rewards, terminated, ended, next_values, gamma, lam):
    """The recursion written out per column, in plain Python."""
    horizon, batch = rewards.shape
    returns = np.zeros((horizon, batch))
    for b in range(batch):
        for t in reversed(range(horizon)):
            last = t == horizon - 1 or ended[t, b]
            following = next_values[t, b] if last else returns[t + 1, b]
            returns[t, b] = rewards[t, b] + gamma * (not terminated[t, b]) * ((1 - lam) * next_values[t, b] + lam * following)
    return returns


def test_lambda_returns() -> None:
    rng = np.random.default_rng(0)
    rewards, next_values = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    ended = rng.random((6, 5)) < 0.25
    terminated = ended & (rng.random((6, 5)) < 0.5)
    tensors = [torch.as_tensor(a) for a in (rewards, terminated, ended, next_values)]
    for gamma, lam in [(0.9, 0.95), (0.99, 0.0), (1.0, 1.0)]:
        np.testing.assert_allclose(lambda_returns(*tensors, gamma, lam).numpy(),
                                   _reference_lambda_returns(rewards, terminated, ended, next_values, gamma, lam), atol=1e-12)
    # lam = 0 is one-step TD; lam = 1 without ends is the discounted reward sum plus the discounted last value.
    one_step = lambda_returns(*tensors, 0.9, 0.0).numpy()
    np.testing.assert_allclose(one_step, rewards + 0.9 * ~terminated * next_values, atol=1e-12)
    never = torch.zeros(6, 5, dtype=torch.bool)
    full = lambda_returns(tensors[0], never, never, tensors[3], 0.9, 1.0).numpy()
    discounts = 0.9 ** np.arange(6)
    np.testing.assert_allclose(full[0], discounts @ rewards + 0.9**6 * next_values[-1], atol=1e-12)


def _rigged_bundle(tiny: Tiny, path: Path) -> Path:
    """The tiny bundle with M rewired: reward +0.76 a step after action 2, -0.76 after the others; dreams never end."""
    wm = WorldModel.load(tiny.bundle)
    m = wm.mdnrnn
    hidden, z_dim = m.hidden_size, m.z_dim
    with torch.no_grad():
        for parameter in m.lstm.parameters():
            parameter[[gate * hidden for gate in range(4)]] = 0.0  # unit 0 of each gate (i, f, g, o) listens to nothing...
        m.lstm.bias_ih_l0[[0, hidden, 3 * hidden]] = torch.tensor([10.0, -10.0, 10.0])  # ...input open, no memory, output open
        m.lstm.weight_ih_l0[2 * hidden, z_dim + 2] = 10.0  # ...and its cell input is tanh(+5) after action 2, tanh(-5) else
        m.lstm.bias_ih_l0[2 * hidden] = -5.0
        m.reward_head.weight.zero_()
        m.reward_head.bias.zero_()
        m.reward_head.weight[0, 0] = 1.0  # reward = h[0]
        m.done_head.weight.zero_()
        m.done_head.bias.fill_(-20.0)
    return wm.save(path)


def test_actor_critic_learns_the_rewarded_action(tiny_discrete: Tiny, tmp_path: Path) -> None:
    bundle = _rigged_bundle(tiny_discrete, tmp_path / "rigged")
    config = ActorCriticConfig(iterations=60, batch=32, horizon=8, hidden=32, layers=1, actor_lr=3e-3, critic_lr=3e-3,
                               checkpoint_every=30)
    policy = train_actor_critic(bundle, tmp_path / "ac", config, progress=False)
    history = json.loads((tmp_path / "ac" / "agent.json").read_text())["history"]
    # A uniform policy earns (0.76 - 2 * 0.76) / 3 = -0.25 a step; always action 2 earns 0.76.
    assert [h["iteration"] for h in history] == [30, 60]
    assert history[-1]["imagined_reward"] > 0.6 and history[-1]["imagined_reward"] > history[0]["imagined_reward"]
    obs, _ = dreamenv.make_dream_vec(bundle, 64).reset(seed=1)
    actions, _ = policy.predict(obs, deterministic=True)
    assert np.mean(actions == 2) > 0.9
    assert policy.predict(obs[0])[0] == actions[0]  # one observation or a batch


def test_train_agent_actor_critic_resumes_and_scores(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "ac.toml"
    recipe.write_text("[actor_critic]\nhorizon = 5\nhidden = 16\nlayers = 1\ncheckpoint_every = 2\n")
    bundle, out = str(tiny_discrete.bundle), tmp_path / "ac"
    common = ["train-agent", bundle, "--algo", "actor-critic", "--out", str(out), "--config", str(recipe), "--n-envs", "8"]
    assert main([*common, "--timesteps", "80"]) == 0  # 80 imagined steps = 2 updates of 8 x 5
    info = json.loads((out / "agent.json").read_text())
    assert info["algo"] == "actor-critic" and info["iterations"] == 2 and info["config"]["batch"] == 8
    assert (out / "train" / "state.json").is_file()
    assert main([*common, "--timesteps", "160"]) == 0
    assert json.loads((out / "agent.json").read_text())["iterations"] == 4
    policy = load_policy(out, bundle=bundle)
    assert isinstance(policy, ActorCriticPolicy) and policy.info["iterations"] == 4
    capsys.readouterr()
    assert main(["compare", bundle, "--policy", str(out), "--episodes", "2", "--backend", "serial"]) == 0
    assert f"policy {out}" in capsys.readouterr().out
    assert main(["train-agent", str(tiny_box.bundle), "--algo", "actor-critic", "--out", str(tmp_path / "box")]) == 2
    assert "Discrete" in capsys.readouterr().err
