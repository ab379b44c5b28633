"""Agents trained in the dream: `dreamenv train-agent` (SB3 PPO and SAC, CMA-ES), saved, resumed, scored (the actor-critic: test_actor_critic.py)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from stable_baselines3 import PPO, SAC

import dreamenv
from dreamenv.agents.controller import LinearController
from dreamenv.agents.saved import load_agent
from dreamenv.agents.sb3 import PPOConfig, SACConfig, train_ppo, train_sac
from dreamenv.cli import main
from dreamenv.compare import load_policy
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny


TINY_TABLES = {
    "ppo": "n_steps = 32\nbatch_size = 32\ncheckpoint_every = 64\n",  # small updates (2 dreams x 32 steps)
    # a 500-transition buffer, batches of 16, 32 random steps before training
    "sac": "buffer_size = 500\nbatch_size = 16\nlearning_starts = 32\ncheckpoint_every = 64\n",
}


def _recipe(tmp_path: Path, algo: str) -> Path:
    """A recipe with a tiny [ppo] or [sac] table (TINY_TABLES): a checkpoint every 64 steps."""
    recipe = tmp_path / f"{algo}.toml"
    recipe.write_text(f"[{algo}]\n{TINY_TABLES[algo]}")
    return recipe


def test_train_agent_ppo_saves_resumes_and_scores(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = str(tiny_discrete.bundle), tmp_path / "ppo"
    common = ["train-agent", bundle, "--algo", "ppo", "--out", str(out), "--config", str(_recipe(tmp_path, "ppo")),
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


def test_train_agent_sac_saves_resumes_and_runs_in_reality(tiny_box: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = str(tiny_box.bundle), tmp_path / "sac"
    common = ["train-agent", bundle, "--algo", "sac", "--out", str(out), "--config", str(_recipe(tmp_path, "sac")),
              "--n-envs", "2", "--temperature", "0.7"]
    assert main([*common, "--timesteps", "200"]) == 0
    assert f"agent: {out}" in capsys.readouterr().out
    info = json.loads((out / "agent.json").read_text())
    wm = WorldModel.load(tiny_box.bundle)
    assert info["algo"] == "sac" and info["env_id"] == wm.env_id and info["bundle_fingerprint"] == wm.fingerprint
    assert info["temperature"] == 0.7 and info["timesteps"] == 200 and info["config"]["buffer_size"] == 500
    model = load_agent(out)
    assert isinstance(model, SAC) and model.num_timesteps == 200 and model.n_envs == 2 and model.batch_size == 16
    assert model._n_updates == (200 - 32) // 2  # one gradient step per step of both dreams once 32 steps are in

    # Rerun with more: it continues from 200 with an empty replay buffer, refilled by 32 steps before training.
    assert main([*common, "--timesteps", "264"]) == 0
    resumed = load_agent(out)
    assert resumed.num_timesteps == 264 and json.loads((out / "agent.json").read_text())["timesteps"] == 264
    assert resumed._n_updates - model._n_updates == (264 - 200 - 32) // 2

    # The policy trained in the dream acts in the real game's Box, and the harness scores it from its directory.
    real = dreamenv.make_real(bundle)
    obs, _ = real.reset(seed=0)
    action, _ = resumed.predict(obs, deterministic=True)
    assert real.action_space.contains(action) and dreamenv.make_dream(bundle).action_space == real.action_space
    real.step(action)
    capsys.readouterr()
    assert main(["compare", bundle, "--policy", str(out), "--episodes", "2", "--backend", "serial", "--temperatures", "0.7"]) == 0
    assert f"policy {out}" in capsys.readouterr().out


def test_sac_refuses_discrete_actions(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sac"
    with pytest.raises(ValueError, match=r"SAC needs Box \(continuous\) actions, but .* has Discrete\(3\): "
                                         "train it with --algo ppo, actor-critic or cmaes"):
        train_sac(tiny_discrete.bundle, out, SACConfig(timesteps=1), progress=False)
    assert not out.exists()
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "sac", "--out", str(out)]) == 2
    assert "SAC needs Box" in capsys.readouterr().err


def test_sac_config_errors() -> None:
    with pytest.raises(ValueError, match="unknown SAC settings \\['buffer'\\]"):
        SACConfig.from_dict({"buffer": 100})
    with pytest.raises(ValueError, match="learning_starts must be >= 0"):
        SACConfig(learning_starts=-1)
    with pytest.raises(ValueError, match="gradient_steps must be >= 1, or -1"):
        SACConfig(gradient_steps=0)
    assert SACConfig.from_dict({"gradient_steps": -1, "ent_coef": 0.1}).sb3_kwargs()["gradient_steps"] == -1

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


def test_ppo_from_real_starts_in_short_branches(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """start_data: PPO's dreams begin at states of real episodes and, with max_steps, last at most that long."""
    config = PPOConfig(timesteps=64, n_envs=2, n_steps=32, batch_size=32, start_data=[str(tiny_discrete.rollouts)],
                       real_start_episodes=4, max_steps=5, done_mode="threshold")
    model = train_ppo(tiny_discrete.bundle, tmp_path / "ppo", config, progress=False)
    lengths = [e["l"] for e in model.ep_info_buffer]
    assert len(lengths) >= 64 // 5 and max(lengths) <= 5
    info = json.loads((tmp_path / "ppo" / "agent.json").read_text())
    assert info["starts"] == "real" and 4 <= info["real_start_states"] <= 4 * 20  # 4 episodes of at most 20 steps
    assert info["config"]["start_data"] == [str(tiny_discrete.rollouts)] and info["config"]["max_steps"] == 5
    with pytest.raises(ValueError, match="collect start data"):  # another env's rollouts
        train_ppo(tiny_discrete.bundle, tmp_path / "other", PPOConfig(start_data=[str(tiny_box.rollouts)]), progress=False)
    with pytest.raises(ValueError, match="max_steps must be >= 1"):
        PPOConfig(max_steps=0)
    argv = ["train-agent", str(tiny_discrete.bundle), "--out", str(tmp_path / "x")]
    assert main([*argv, "--algo", "actor-critic", "--max-steps", "5"]) == 2
    assert "--max-steps is an option of ppo, sac" in capsys.readouterr().err
    assert main([*argv, "--algo", "cmaes", "--start-data", str(tiny_discrete.rollouts)]) == 2
    err = capsys.readouterr().err
    assert "--start-data is an option of actor-critic, ppo, sac, dagger" in err and "dreamenv controller --start-data" in err


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
    assert "PPO, SAC and actor-critic options" in capsys.readouterr().err
