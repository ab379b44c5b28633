"""The Dreamer-style actor-critic: lambda-returns, Discrete and Box policies, imagination from real states, train-agent."""
from __future__ import annotations

import json
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch

import dreamenv
from dreamenv.agents.actor_critic import (ActionHead, ActorCriticConfig, ActorCriticPolicy, alive_weights, lambda_returns,
                                          mlp, train_actor_critic)
from dreamenv.agents.controller import LinearController
from dreamenv.agents.dynamics import imagine_differentiably
from dreamenv.agents.ensemble import ActorCriticEnsemble, save_ensemble
from dreamenv.agents.starts import StartStates, real_start_bank
from dreamenv.agents.saved import write_agent_info
from dreamenv.cli import main
from dreamenv.compare import load_policy
from dreamenv.data.dataset import open_rollouts
from dreamenv.envs.dream import DreamState, dream_core
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny, assert_differentiable_step_is_the_dream_step

CAR_RACING_LIKE = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))  # steer, gas, brake


def _reference_lambda_returns(rewards, continues, ended, next_values, gamma, lam):
    """The recursion written out per column, in plain Python."""
    horizon, batch = rewards.shape
    returns = np.zeros((horizon, batch))
    for b in range(batch):
        for t in reversed(range(horizon)):
            last = t == horizon - 1 or ended[t, b]
            following = next_values[t, b] if last else returns[t + 1, b]
            returns[t, b] = rewards[t, b] + gamma * continues[t, b] * ((1 - lam) * next_values[t, b] + lam * following)
    return returns


def test_lambda_returns() -> None:
    rng = np.random.default_rng(0)
    rewards, next_values = rng.normal(size=(6, 5)), rng.normal(size=(6, 5))
    ended = rng.random((6, 5)) < 0.25
    terminated = ended & (rng.random((6, 5)) < 0.5)
    for continues in (~terminated * 1.0, rng.random((6, 5))):  # sampled ends, or p(continue) ("expected")
        tensors = [torch.as_tensor(a) for a in (rewards, continues, ended, next_values)]
        for gamma, lam in [(0.9, 0.95), (0.99, 0.0), (1.0, 1.0)]:
            np.testing.assert_allclose(lambda_returns(*tensors, gamma, lam).numpy(),
                                       _reference_lambda_returns(rewards, continues, ended, next_values, gamma, lam), atol=1e-12)
        # lam = 0 is one-step TD
        one_step = lambda_returns(*tensors, 0.9, 0.0).numpy()
        np.testing.assert_allclose(one_step, rewards + 0.9 * continues * next_values, atol=1e-12)
    # lam = 1 without ends is the discounted reward sum plus the discounted last value.
    never = torch.zeros(6, 5, dtype=torch.bool)
    full = lambda_returns(tensors[0], torch.ones(6, 5, dtype=torch.float64), never, tensors[3], 0.9, 1.0).numpy()
    discounts = 0.9 ** np.arange(6)
    np.testing.assert_allclose(full[0], discounts @ rewards + 0.9**6 * next_values[-1], atol=1e-12)


def test_alive_weights() -> None:
    continues = torch.tensor([[0.5, 0.9], [0.5, 0.8], [0.5, 0.7], [0.5, 0.6]])
    ended = torch.tensor([[False, False], [True, False], [False, False], [False, False]])
    # column 0 restarts after step 1, so step 2 is a first step again; column 1 runs on.
    np.testing.assert_allclose(alive_weights(continues, ended).numpy(),
                               [[1.0, 1.0], [0.5, 0.9], [1.0, 0.72], [0.5, 0.504]], rtol=1e-6)


def _rigged_bundle(tiny: Tiny, path: Path) -> Path:
    """The tiny bundle with M rewired so that reward = tanh(tanh(x)), x = 10 * [action == 2] - 5 for Discrete(3) and
    x = 5 * action[0] for Box(-1, 1, (2,)): +0.76 for action 2 or action[0] = 1, -0.76 at the other end; dreams never end."""
    wm = WorldModel.load(tiny.bundle)
    m = wm.mdnrnn
    hidden, z_dim = m.hidden_size, m.z_dim
    column, weight, bias = (z_dim + 2, 10.0, -5.0) if tiny.kind == "discrete" else (z_dim, 5.0, 0.0)
    with torch.no_grad():
        for parameter in m.lstm.parameters():
            parameter[[gate * hidden for gate in range(4)]] = 0.0  # unit 0 of each gate (i, f, g, o) listens to nothing...
        m.lstm.bias_ih_l0[[0, hidden, 3 * hidden]] = torch.tensor([10.0, -10.0, 10.0])  # ...input open, no memory, output open
        m.lstm.weight_ih_l0[2 * hidden, column] = weight  # ...and its cell input is tanh(x)
        m.lstm.bias_ih_l0[2 * hidden] = bias
        m.reward_head.weight.zero_()
        m.reward_head.bias.zero_()
        m.reward_head.weight[0, 0] = 1.0  # reward = h[0]
        m.done_head.weight.zero_()
        m.done_head.bias.fill_(-20.0)
    return wm.save(path)


def _small(**overrides) -> ActorCriticConfig:
    """A config for tiny runs: 32 dreams x 8 steps, one hidden layer of 32, fast learning rates."""
    settings = dict(iterations=60, batch=32, horizon=8, hidden=32, layers=1, actor_lr=3e-3, critic_lr=3e-3, checkpoint_every=30)
    return ActorCriticConfig(**{**settings, **overrides})


def test_actor_critic_learns_the_rewarded_action(tiny_discrete: Tiny, tmp_path: Path) -> None:
    bundle = _rigged_bundle(tiny_discrete, tmp_path / "rigged")
    policy = train_actor_critic(bundle, tmp_path / "ac", _small(), progress=False)
    history = json.loads((tmp_path / "ac" / "agent.json").read_text())["history"]
    # A uniform policy earns (0.76 - 2 * 0.76) / 3 = -0.25 a step; always action 2 earns 0.76.
    assert [h["iteration"] for h in history] == [30, 60]
    assert history[-1]["imagined_reward"] > 0.6 and history[-1]["imagined_reward"] > history[0]["imagined_reward"]
    obs, _ = dreamenv.make_dream_vec(bundle, 64).reset(seed=1)
    actions, _ = policy.predict(obs, deterministic=True)
    assert np.mean(actions == 2) > 0.9
    assert policy.predict(obs[0])[0] == actions[0]  # one observation or a batch


def _deadly_bundle(tiny: Tiny, path: Path) -> Path:
    """The rigged Discrete bundle with a constant reward of 1 and a done head that reads the action: p(done) is
    sigmoid(5 h[0] - 3), about 0.69 after action 2 and 0.001 after the others."""
    wm = WorldModel.load(_rigged_bundle(tiny, path))
    m = wm.mdnrnn
    with torch.no_grad():
        m.reward_head.weight.zero_()
        m.reward_head.bias.fill_(1.0)
        m.done_head.weight[0, 0] = 5.0
        m.done_head.bias.fill_(-3.0)
    return wm.save(path)


@pytest.mark.parametrize("done_mode", ["sample", "expected"])
def test_actor_critic_avoids_the_deadly_action(tiny_discrete: Tiny, tmp_path: Path, done_mode: str) -> None:
    bundle = _deadly_bundle(tiny_discrete, tmp_path / "deadly")
    policy = train_actor_critic(bundle, tmp_path / "ac", _small(done_mode=done_mode, iterations=100), progress=False)
    assert json.loads((tmp_path / "ac" / "agent.json").read_text())["config"]["done_mode"] == done_mode
    obs, _ = dreamenv.make_dream_vec(bundle, 64).reset(seed=1)
    with torch.no_grad():
        deadly = policy.head.distribution(policy.actor(torch.from_numpy(obs))).probs[:, 2]
    assert float(deadly.max()) < 0.05  # the untrained actor's is about a third
    with pytest.raises(ValueError, match="done_mode"):
        ActorCriticConfig(done_mode="sometimes")


def test_actor_critic_learns_a_box_action(tiny_box: Tiny, tmp_path: Path) -> None:
    bundle = _rigged_bundle(tiny_box, tmp_path / "rigged")
    policy = train_actor_critic(bundle, tmp_path / "ac", _small(), progress=False)
    info = json.loads((tmp_path / "ac" / "agent.json").read_text())
    # The untrained actor's actions centre on 0 (reward about 0); steering action[0] to the top earns up to 0.76.
    rewards = [h["imagined_reward"] for h in info["history"]]
    assert rewards[-1] > 0.65 and rewards[-1] > rewards[0]
    obs, _ = dreamenv.make_dream_vec(bundle, 64).reset(seed=1)
    actions, _ = policy.predict(obs, deterministic=True)
    assert actions.dtype == np.float32 and actions.shape == (64, 2)
    assert np.all(actions >= -1) and np.all(actions <= 1) and np.mean(actions[:, 0] > 0.5) > 0.9


def test_box_policy_stays_in_bounds_and_round_trips(tiny_box: Tiny, tmp_path: Path) -> None:
    torch.manual_seed(0)
    head = ActionHead(CAR_RACING_LIKE)
    actor = mlp(6, head.outputs, 16, 1)
    with torch.no_grad():
        actor[-1].weight.mul_(50.0)  # large outputs: the means saturate and samples fall far outside [-1, 1]
    policy = ActorCriticPolicy(actor, head)
    obs = np.random.default_rng(0).normal(size=(200, 6)).astype(np.float32)
    for deterministic in (True, False):
        actions, state = policy.predict(obs, deterministic=deterministic)
        assert state is None and actions.dtype == np.float32 and actions.shape == (200, 3)
        assert np.all(actions >= CAR_RACING_LIKE.low) and np.all(actions <= CAR_RACING_LIKE.high)
        one, _ = policy.predict(obs[0], deterministic=deterministic)
        assert one.dtype == np.float32 and one.shape == (3,) and CAR_RACING_LIKE.contains(one)
    sampled, _ = policy.predict(obs, deterministic=False)
    assert np.any(sampled[:, 1] == 0.0) and np.any(sampled[:, 1] == 1.0)  # clipped to gas's [0, 1], not to [-1, 1]
    # The mean's [-1, 1] maps linearly onto [low, high]: a zero output is the middle of each bound.
    np.testing.assert_allclose(head.to_env(torch.zeros(1, 3))[0], [0.0, 0.5, 0.5])

    out = tmp_path / "agent"
    out.mkdir()
    policy.save(out)
    write_agent_info(out, "actor-critic", WorldModel.load(tiny_box.bundle), str(tiny_box.bundle), {})
    assert sorted(p.name for p in out.iterdir()) == ["actor_critic.safetensors", "agent.json"]  # no pickle
    loaded = ActorCriticPolicy.load(out)
    assert loaded.action_space == CAR_RACING_LIKE and loaded.head == head
    np.testing.assert_array_equal(loaded.predict(obs, deterministic=True)[0], policy.predict(obs, deterministic=True)[0])

    with pytest.raises(ValueError, match="infinite bounds"):
        ActionHead(gym.spaces.Box(-np.inf, np.inf, (2,), np.float32))


def test_differentiable_step_is_the_dream_step(tiny_box: Tiny) -> None:
    """The autograd step of the dynamics gradient is DreamCore.step, and passes the reward's gradient to the actions."""
    assert_differentiable_step_is_the_dream_step(tiny_box.bundle, lambda state, reward: reward.sum() + state.z.sum())


def test_differentiable_imagination_stops_counting_at_the_step_limit(tiny_box: Tiny) -> None:
    wm = WorldModel.load(tiny_box.bundle)
    wm.max_episode_steps = 5
    core = dream_core(wm)
    rng = np.random.default_rng(0)
    start, _ = StartStates(core, None).draw(2, rng)
    batch, last = imagine_differentiably(wm, DreamState(*(x.clone() for x in start)), np.array([0, 3]), 4,
                                         lambda obs: torch.tanh(obs[:, :2]), 1.0,
                                         [core.draw_noise(rng, 2) for _ in range(4)], "latent")
    # Dream 0 takes steps 1..4 of its episode; dream 1 steps 4..7, so it reaches the limit (5) at its second step.
    np.testing.assert_array_equal(batch["ended"].numpy(), [[False, False], [False, True], [False, False], [False, False]])
    np.testing.assert_array_equal(batch["valid"].numpy(), [[True, True], [True, True], [True, False], [True, False]])
    assert batch["obs"].shape == (4, 2, wm.z_dim + wm.hidden_size) and batch["actions"].shape == (4, 2, 2)
    np.testing.assert_array_equal(batch["successors"][-1].detach().numpy(), torch.cat([last.z, last.h], -1).detach().numpy())
    np.testing.assert_array_equal(batch["successors"][:-1].detach().numpy(), batch["obs"][1:].detach().numpy())


def test_actor_critic_learns_a_box_action_through_m(tiny_box: Tiny, tmp_path: Path) -> None:
    """actor_gradient "dynamics": the returns' gradient through M's steps moves the actor to the rewarded action, from
    real starts and from dreams that run on across updates (and restart at the step limit, here 20 steps)."""
    bundle = _rigged_bundle(tiny_box, tmp_path / "rigged")
    policy = train_actor_critic(bundle, tmp_path / "ac", _small(actor_gradient="dynamics", done_mode="expected"),
                                progress=False)
    info = json.loads((tmp_path / "ac" / "agent.json").read_text())
    assert info["config"]["actor_gradient"] == "dynamics" and info["starts"] == "real"
    rewards = [h["imagined_reward"] for h in info["history"]]
    assert rewards[-1] > 0.65 and rewards[-1] > rewards[0]
    short = WorldModel.load(bundle)
    short.max_episode_steps = 20
    short.save(tmp_path / "short")
    train_actor_critic(tmp_path / "short", tmp_path / "ac-short",
                       _small(actor_gradient="dynamics", done_mode="expected", real_starts=False), progress=False)
    history = json.loads((tmp_path / "ac-short" / "agent.json").read_text())["history"]
    assert history[-1]["imagined_reward"] > 0.65
    assert history[-1]["dream_return"] > 0.65 * 20  # whole dreams of 20 steps, counted up to the limit and no further
    obs, _ = dreamenv.make_dream_vec(bundle, 64).reset(seed=1)
    actions, _ = policy.predict(obs, deterministic=True)
    assert np.mean(actions[:, 0] > 0.5) > 0.9


def test_dynamics_gradient_refusals(tiny_discrete: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="done_mode 'expected'"):
        ActorCriticConfig(actor_gradient="dynamics")
    with pytest.raises(ValueError, match="actor_gradient must be"):
        ActorCriticConfig(actor_gradient="backprop")
    with pytest.raises(ValueError, match="needs Box actions"):
        train_actor_critic(tiny_discrete.bundle, tmp_path / "ac", _small(actor_gradient="dynamics", done_mode="expected"),
                           progress=False)


def _episode_states(wm: WorldModel, rollouts: Path) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each real episode's (z_t, h_t) for every step, computed in one go: V's means, and M's LSTM over the sequence."""
    episodes = []
    with open_rollouts(rollouts) as store:
        actions = store.load_arrays()["actions"]
        for start, end in store.episode_bounds():
            z = wm.encode_frames(store.load_frames(np.arange(start, end)))
            with torch.no_grad():
                outputs, _ = wm.mdnrnn.lstm(torch.cat([z, wm.encode_actions(actions[start:end])], -1)[None])
            h = torch.cat([torch.zeros(1, wm.hidden_size), outputs[0, :-1]])  # h_0 = 0, h_t after steps < t
            episodes.append((z.numpy(), h.numpy()))
    return episodes


def test_real_starts_are_the_data_states(tiny_discrete: Tiny) -> None:
    wm = WorldModel.load(tiny_discrete.bundle)
    bank = real_start_bank(wm, 1000, np.random.default_rng(0))  # 1000 > the 12 episodes: all of them
    (z, h, _), steps = bank
    episodes = _episode_states(wm, tiny_discrete.rollouts)
    assert len(steps) == sum(len(e[0]) for e in episodes) and np.sum(steps == 0) == len(episodes)
    for row in range(len(steps)):  # every bank row is one real step's (z_t, h_t), at its step number
        t = steps[row]
        candidates = [(ez[t], eh[t]) for ez, eh in episodes if t < len(ez)]
        gap = min(np.abs(z[row].numpy() - cz).max() + np.abs(h[row].numpy() - ch).max() for cz, ch in candidates)
        assert gap < 1e-4

    core = dream_core(wm)
    rng = np.random.default_rng(1)
    real, real_steps = StartStates(core, bank).draw(500, rng)
    initial, initial_steps = StartStates(core, None).draw(500, rng)
    assert np.all(initial_steps == 0) and torch.all(initial.h == 0)  # the dream's usual starts: first frames, h = 0
    assert real_steps.max() > 5 and (real.h.abs().amax(1) > 0).float().mean() > 0.5  # real starts: mid-episode states
    bank_obs = torch.cat([z, h], -1)
    assert torch.cdist(torch.cat([real.z, real.h], -1), bank_obs, compute_mode="donot_use_mm_for_euclid_dist").amin(1).max() == 0  # all drawn from the bank


def test_done_critics_make_deaths_they_predict_count(tiny_discrete: Tiny, tmp_path: Path) -> None:
    wm = WorldModel.load(_rigged_bundle(tiny_discrete, tmp_path / "paying"))
    with torch.no_grad():
        wm.mdnrnn.reward_head.bias.fill_(1.0)  # action 2 pays 1.76 a step, the others 0.24; this M sees no deaths
    paying = wm.save(tmp_path / "paying")
    deadly = _deadly_bundle(tiny_discrete, tmp_path / "deadly")  # same V; its M kills 69% of the time after action 2
    obs, _ = dreamenv.make_dream_vec(paying, 64).reset(seed=1)

    def chance_of_action_2(out: Path, **settings) -> float:
        settings = {"iterations": 100, "done_mode": "expected", **settings}
        policy = train_actor_critic(paying, out, _small(**settings), progress=False)
        with torch.no_grad():
            return float(policy.head.distribution(policy.actor(torch.from_numpy(obs))).probs[:, 2].mean())

    assert chance_of_action_2(tmp_path / "alone") > 0.9
    assert chance_of_action_2(tmp_path / "judged", done_critics=[str(deadly)]) < 0.05
    assert json.loads((tmp_path / "judged" / "agent.json").read_text())["config"]["done_critics"] == [str(deadly)]
    assert chance_of_action_2(tmp_path / "judged-initial", done_critics=[str(deadly)], real_starts=False,
                              iterations=200) < 0.05


def test_done_critics_refusals(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path,
                               capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="done_critics.*'expected'"):
        ActorCriticConfig(done_critics=[str(tiny_discrete.bundle)], done_mode="sample")
    for critic, problem in ((tiny_box.bundle, "world model of"), (tiny_discrete.bundle, None)):
        if problem is None:  # the same M with another V
            wm = WorldModel.load(tiny_discrete.bundle)
            with torch.no_grad():
                next(wm.vae.parameters()).add_(0.1)
            critic, problem = wm.save(tmp_path / "other-v"), "another V.*--vae-from"
        with pytest.raises(ValueError, match=problem):
            train_actor_critic(tiny_discrete.bundle, tmp_path / "ac", _small(iterations=1, done_mode="expected",
                                                                            done_critics=[str(critic)]), progress=False)
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "ppo", "--out", str(tmp_path / "ppo"),
                 "--done-critics", str(tiny_discrete.bundle)]) != 0
    assert "--done-critics is an option of actor-critic" in capsys.readouterr().err


def test_real_starts_option(tiny_discrete: Tiny, tmp_path: Path) -> None:
    config = _small(iterations=1, batch=8, horizon=3, real_start_episodes=5)
    train_actor_critic(tiny_discrete.bundle, tmp_path / "real", config, progress=False)
    info = json.loads((tmp_path / "real" / "agent.json").read_text())
    assert info["starts"] == "real" and 5 <= info["real_start_states"] <= 5 * 20  # 5 episodes of at most 20 steps

    wm = WorldModel.load(tiny_discrete.bundle)
    wm.info["data"]["rollouts"] = [str(tmp_path / "gone.h5")]
    bundle = wm.save(tmp_path / "no-data")
    with pytest.warns(UserWarning, match="initial states.*gone.h5"):
        train_actor_critic(bundle, tmp_path / "auto", config, progress=False)
    assert json.loads((tmp_path / "auto" / "agent.json").read_text())["starts"] == "initial"
    with pytest.raises(ValueError, match="real_starts needs the bundle's rollouts.*gone.h5"):
        train_actor_critic(bundle, tmp_path / "forced", _small(iterations=1, real_starts=True), progress=False)
    train_actor_critic(tiny_discrete.bundle, tmp_path / "off", _small(iterations=1, batch=8, real_starts=False), progress=False)
    assert json.loads((tmp_path / "off" / "agent.json").read_text())["starts"] == "initial"


def test_real_starts_from_other_data(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    wm = WorldModel.load(tiny_discrete.bundle)
    wm.info["data"]["rollouts"] = [str(tmp_path / "gone.h5")]  # as a shipped bundle: its own data is not here
    bundle = wm.save(tmp_path / "no-data")
    with pytest.raises(FileNotFoundError, match="--start-data"):
        real_start_bank(WorldModel.load(bundle), 3, np.random.default_rng(0))
    config = _small(iterations=1, batch=8, horizon=3, start_data=[str(tiny_discrete.rollouts)])
    train_actor_critic(bundle, tmp_path / "other", config, progress=False)
    info = json.loads((tmp_path / "other" / "agent.json").read_text())
    assert info["starts"] == "real" and info["config"]["start_data"] == [str(tiny_discrete.rollouts)]
    with pytest.raises(ValueError, match="holds .* rollouts.*collect start data"):  # another env's data
        real_start_bank(WorldModel.load(bundle), 3, np.random.default_rng(0), data=[tiny_box.rollouts])
    with pytest.raises(ValueError, match="start_data is where real starts come from"):
        _small(real_starts=False, start_data=[str(tiny_discrete.rollouts)])
    capsys.readouterr()  # the CLI: --start-data is the actor-critic's, PPO's and SAC's, not CMA-ES's
    assert main(["train-agent", str(bundle), "--algo", "cmaes", "--out", str(tmp_path / "cma"), "--start-data", str(tiny_discrete.rollouts)]) != 0
    assert "cmaes does not use it" in capsys.readouterr().err and not (tmp_path / "cma").exists()


def test_temperature_range_gives_each_dream_its_tau(tiny_discrete: Tiny, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from dreamenv.agents import actor_critic

    seen = []

    def recording_core(wm: WorldModel):
        core = dream_core(wm)
        step = core.step

        def recorded(state, actions, temperature, *args):
            seen.append(temperature)
            return step(state, actions, temperature, *args)

        core.step = recorded
        return core

    monkeypatch.setattr(actor_critic, "dream_core", recording_core)
    train_actor_critic(tiny_discrete.bundle, tmp_path / "ac", _small(iterations=3, batch=16, horizon=4, temperature_range=(1.0, 1.3)),
                       progress=False)
    taus = torch.stack(seen)
    assert taus.shape == (12, 16) and taus.min() >= 1.0 and taus.max() <= 1.3
    assert (taus[0].std() > 0.03) and not torch.equal(taus[0], taus[4])  # per dream, new ones for each update's starts
    assert json.loads((tmp_path / "ac" / "agent.json").read_text())["temperature"] == [1.0, 1.3]
    with pytest.raises(ValueError, match="0 < low <= high"):
        _small(temperature_range=(1.3, 1.0))


def test_shipped_agent_by_name(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import shutil

    from dreamenv import registry

    checkpoints = tmp_path / "checkpoints"
    shutil.copytree(tiny_discrete.bundle, checkpoints / "Tiny" / "bundle")
    train_actor_critic(checkpoints / "Tiny" / "bundle", checkpoints / "Tiny" / "agent", _small(iterations=1, batch=8),
                       progress=False)
    monkeypatch.setattr(registry, "CHECKPOINTS", checkpoints)
    policy = dreamenv.load_agent("Tiny", bundle="Tiny")
    assert isinstance(policy, ActorCriticPolicy) and policy.info["iterations"] == 1
    assert isinstance(load_policy("Tiny", algo="actor-critic", bundle=tiny_discrete.bundle), ActorCriticPolicy)
    with pytest.raises(ValueError, match="holds a actor-critic agent, not ppo"):
        load_policy("Tiny", algo="ppo")
    with pytest.raises(FileNotFoundError, match=r"nor a shipped agent name \(shipped: Tiny\)"):
        dreamenv.load_agent("Nope")


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

    box = tmp_path / "box"  # a Box-action bundle trains and scores the same way, here on expected ends through M
    assert main(["train-agent", str(tiny_box.bundle), "--algo", "actor-critic", "--out", str(box), "--config", str(recipe),
                 "--n-envs", "8", "--timesteps", "40", "--done-mode", "expected", "--actor-gradient", "dynamics"]) == 0
    box_info = json.loads((box / "agent.json").read_text())
    assert box_info["starts"] == "real" and box_info["config"]["done_mode"] == "expected"
    assert box_info["config"]["actor_gradient"] == "dynamics"
    capsys.readouterr()
    assert main(["train-agent", bundle, "--algo", "cmaes", "--out", str(tmp_path / "no"), "--actor-gradient", "dynamics"]) == 2
    err = capsys.readouterr().err
    assert "--actor-gradient is an option of actor-critic here; cmaes" in err and "dreamenv controller" not in err
    ppo = tmp_path / "ppo"  # PPO takes expected ends too (DreamVectorEnv's survival-weighted rewards)
    assert main(["train-agent", bundle, "--algo", "ppo", "--out", str(ppo), "--timesteps", "64", "--n-envs", "2",
                 "--done-mode", "expected"]) == 0
    assert json.loads((ppo / "agent.json").read_text())["config"]["done_mode"] == "expected"
    assert load_policy(box, bundle=str(tiny_box.bundle)).action_space == WorldModel.load(tiny_box.bundle).action_space
    capsys.readouterr()
    assert main(["compare", str(tiny_box.bundle), "--policy", str(box), "--episodes", "2", "--backend", "serial"]) == 0
    assert f"policy {box}" in capsys.readouterr().out


def test_actor_critic_on_the_cell_state(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """obs_mode "latent_cell": actor and critic read [z, c, h], the agent records it, and compare, ensembles and a
    resume all keep to it."""
    from dreamenv.compare import compare

    out = tmp_path / "cell"
    policy = train_actor_critic(tiny_discrete.bundle, out, _small(iterations=2, obs_mode="latent_cell"), progress=False)
    assert policy.obs_mode == "latent_cell" and policy.actor[0].in_features == 4 + 16 + 16
    assert json.loads((out / "agent.json").read_text())["obs_mode"] == "latent_cell"
    result = compare(str(out), tiny_discrete.bundle, episodes=2, backend="serial", progress=False)
    assert result["obs_mode"] == "latent_cell" and len(result["actual"]["scores"]) == 2
    latent, _ = dreamenv.make_dream(tiny_discrete.bundle).reset(seed=0)  # [z, h] is too narrow for this actor
    with pytest.raises(ValueError, match="width 36 .*obs_mode 'latent_cell'.*got shape \\(20,\\)"):
        policy.predict(latent)
    with pytest.raises(ValueError, match="obs_mode 'latent_cell', not 'latent'"):
        train_actor_critic(tiny_discrete.bundle, out, _small(iterations=4), progress=False)
    plain = train_actor_critic(tiny_discrete.bundle, tmp_path / "plain", _small(iterations=2), progress=False)
    assert plain.obs_mode == "latent"
    with pytest.raises(ValueError, match="width 20 .*obs_mode 'latent'"):
        plain.predict(np.zeros(36, np.float32))
    with pytest.raises(ValueError, match="must read one obs_mode"):
        save_ensemble(tmp_path / "ens", [out, tmp_path / "plain"])
    assert not (tmp_path / "ens").exists()  # refused before anything is written
    with pytest.raises(ValueError, match="obs_mode must be"):
        ActorCriticConfig(obs_mode="pixels")

    recipe = tmp_path / "ac.toml"  # the CLI's --obs-mode
    recipe.write_text("[actor_critic]\nhorizon = 5\nhidden = 16\nlayers = 1\n")
    common = ["train-agent", str(tiny_discrete.bundle), "--config", str(recipe), "--obs-mode", "latent_cell", "--n-envs", "8",
              "--timesteps", "40"]
    assert main([*common, "--algo", "actor-critic", "--out", str(tmp_path / "cli")]) == 0
    assert load_policy(tmp_path / "cli", bundle=tiny_discrete.bundle).obs_mode == "latent_cell"
    cells = dreamenv.load_agent(save_ensemble(tmp_path / "cells", [out, tmp_path / "cli"]))
    assert cells.obs_mode == "latent_cell"
    with pytest.raises(ValueError, match="width 36 .*obs_mode 'latent_cell'"):
        cells.predict(latent)
    capsys.readouterr()
    assert main([*common, "--algo", "ppo", "--out", str(tmp_path / "ppo")]) == 2
    err = capsys.readouterr().err
    assert "--obs-mode is an option of actor-critic, cmaes, dagger here; ppo" in err and "dreamenv controller" not in err


@pytest.mark.parametrize("name", ["VizdoomTakeCover", "CarRacing"])
def test_shipped_agent_acts_in_its_envs(name: str) -> None:
    shipped = Path(dreamenv.__file__).parent / "checkpoints" / name / "agent"
    policy = dreamenv.load_agent(name, bundle=name)  # raises unless trained on the shipped bundle
    members = policy.members if isinstance(policy, ActorCriticEnsemble) else [policy]
    folders = [shipped / m for m in policy.info["members"]] if len(members) > 1 else [shipped]
    for member, folder in zip(members, folders):  # weights + JSON, no pickle; each actor-critic imagined from real starts
        assert sorted(p.name for p in folder.iterdir()) == ["actor_critic.safetensors", "agent.json"]
        assert isinstance(member, ActorCriticPolicy) and member.info["trained_in"] == "dream"
        assert member.info["starts"] == "real" and member.info["config"]["start_data"]
        assert member.info["bundle_fingerprint"] == dreamenv.load_world_model(name).fingerprint
    env = gym.make(f"Dream-{name}-v0", temperature=1.0)
    obs, _ = env.reset(seed=0)
    for _ in range(50):
        action, _ = policy.predict(obs, deterministic=True)
        assert env.action_space.contains(action)
        obs, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            obs, _ = env.reset()
    assert isinstance(load_policy(name, algo="actor-critic"), (ActorCriticPolicy, ActorCriticEnsemble))
    assert isinstance(load_policy(name), LinearController)  # the name alone is still the controller


def test_collect_with_an_actor_critic_agent(tiny_discrete: Tiny, tmp_path: Path) -> None:
    from dreamenv.data.collect import collect
    from dreamenv.envs.real import RealEnv
    from tests.tiny_envs import MODULE

    policy = train_actor_critic(tiny_discrete.bundle, tmp_path / "ac", _small(iterations=1, batch=8), progress=False)
    env_id = f"{MODULE}:{tiny_discrete.env_id}"
    out = collect(env_id, tmp_path / "ac.h5", 2, policy="controller", controller=str(tmp_path / "ac"),
                  bundle=str(tiny_discrete.bundle), algo="actor-critic", seed=7, backend="serial", progress=False)
    with open_rollouts(out) as rollouts:
        start, end = rollouts.episode_bounds()[0]
        first = rollouts.load_arrays()["actions"][start:end]
    real = RealEnv(tiny_discrete.bundle)  # the agent acting in Real-*: the same actions on the same seed
    obs, _ = real.reset(seed=7)
    played, ended = [], False
    while not ended:
        action, _ = policy.predict(obs, deterministic=True)
        played.append(int(action))
        obs, _, terminated, truncated, _ = real.step(action)
        ended = terminated or truncated
    np.testing.assert_array_equal(first, played)

    # epsilon: a seeded share of random actions, recorded in the store's policy name
    explored = [collect(env_id, tmp_path / f"eps{k}.h5", 2, policy="controller", controller=str(tmp_path / "ac"),
                        bundle=str(tiny_discrete.bundle), algo="actor-critic", epsilon=0.5, seed=7, backend="serial",
                        progress=False) for k in (1, 2)]
    actions = []
    for path in explored:
        with open_rollouts(path) as rollouts:
            start, end = rollouts.episode_bounds()[0]
            actions.append(rollouts.load_arrays()["actions"][start:end])
        with h5py.File(path, "r") as f:
            assert f.attrs["policy"].endswith(" epsilon=0.5")
    np.testing.assert_array_equal(actions[0], actions[1])  # the same seed, the same random actions
    steps = min(len(actions[0]), len(played))
    assert (actions[0][:steps] != np.asarray(played[:steps])).any()  # some steps left the agent's choice
    with pytest.raises(ValueError, match=r"epsilon is the probability of a random action: give a value in \[0, 1\]"):
        collect(env_id, tmp_path / "y.h5", 1, policy="controller", controller=str(tmp_path / "ac"),
                bundle=str(tiny_discrete.bundle), algo="actor-critic", epsilon=1.5, progress=False)
    with pytest.raises(ValueError, match="epsilon adds random actions to a trained policy"):
        collect(env_id, tmp_path / "z.h5", 1, epsilon=0.2, progress=False)
    with pytest.raises(ValueError, match="not a `dreamenv train-agent` directory.*holds no actor-critic agent"):
        collect(env_id, tmp_path / "x.h5", 1, policy="controller", controller=str(tiny_discrete.controller),
                bundle=str(tiny_discrete.bundle), algo="actor-critic", progress=False)


def test_iterate_with_an_actor_critic_agent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from tests.conftest import tiny_recipe

    recipe = tiny_recipe(tmp_path, 6, tables="[actor_critic]\niterations = 2\nbatch = 8\nhorizon = 4\nhidden = 16\nlayers = 1\n")
    run = tmp_path / "run"
    assert main(["pipeline", str(recipe)]) == 0
    assert main(["train-agent", str(run / "bundle"), "--algo", "actor-critic", "--out", str(run / "ac"), "--config", str(recipe)]) == 0
    (tmp_path / "agent.toml").write_text(f"""extends = "tiny.toml"
[iterate]
agent = "{run / 'ac'}"
episodes = 3
backend = "serial"
name = "ac-round"
""")
    assert main(["iterate", str(tmp_path / "agent.toml"), "--rounds", "1"]) == 0
    step = run / "ac-round1"
    with h5py.File(step / "rollouts.h5", "r") as f:
        assert f.attrs["policy"] == f"actor-critic:{run / 'ac'}" and f.attrs["num_episodes"] == 3
    info = json.loads((step / "agent" / "agent.json").read_text())
    assert info["algo"] == "actor-critic" and info["iterations"] == 2
    assert info["bundle_fingerprint"] == WorldModel.load(step / "bundle").fingerprint  # trained in the new dream
    first = json.loads((run / "ac" / "agent.json").read_text())
    assert info["starts"] == first["starts"] == "real"  # from the bundle's data, which now has the round's episodes too
    assert info["real_start_states"] > first["real_start_states"]
    result = json.loads((step / "results.json").read_text())
    assert result["policy"] == str(step / "agent") and list(result["virtual"]) == ["1"] and result["actual"]["episodes"] == 2

    (tmp_path / "both.toml").write_text(f'extends = "agent.toml"\n[iterate]\ncontroller = "{run / "controller"}"\n')
    capsys.readouterr()
    assert main(["iterate", str(tmp_path / "both.toml")]) == 2
    assert "names a controller and an agent" in capsys.readouterr().err


def _constant_agent(tiny: Tiny, out: Path, outputs: list[float]) -> Path:
    """An actor-critic agent of the tiny bundle whose actor outputs `outputs` whatever it sees."""
    wm = WorldModel.load(tiny.bundle)
    head = ActionHead(wm.action_space)
    actor = mlp(wm.latent_obs_dim, head.outputs, 8, 1)
    with torch.no_grad():
        actor[-1].weight.zero_()
        actor[-1].bias.copy_(torch.tensor(outputs))
    out.mkdir(parents=True)
    ActorCriticPolicy(actor, head).save(out)
    write_agent_info(out, "actor-critic", wm, str(tiny.bundle), {})
    return out


def test_an_ensemble_acts_on_the_mean_of_its_members(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from dreamenv.agents.ensemble import ActorCriticEnsemble

    # probabilities about (0.6, 0.4, 0) and (0, 0.45, 0.55): each member picks 0 or 2, their mean (0.3, 0.43, 0.28) picks 1
    first = _constant_agent(tiny_discrete, tmp_path / "a", [np.log(0.6), np.log(0.4), -30.0])
    second = _constant_agent(tiny_discrete, tmp_path / "b", [-30.0, np.log(0.45), np.log(0.55)])
    assert main(["ensemble", str(first), str(second), "--out", str(tmp_path / "ens")]) in (None, 0)
    assert "ensemble of 2 actor-critics" in capsys.readouterr().out
    ensemble = dreamenv.load_agent(tmp_path / "ens", bundle=tiny_discrete.bundle)
    assert isinstance(ensemble, ActorCriticEnsemble) and len(ensemble.members) == 2
    obs, _ = dreamenv.make_dream_vec(tiny_discrete.bundle, 16).reset(seed=0)
    assert [m.predict(obs)[0][0] for m in ensemble.members] == [0, 2]
    actions, _ = ensemble.predict(obs)
    assert np.all(actions == 1) and ensemble.predict(obs[0])[0] == 1
    torch.manual_seed(0)
    sampled = np.concatenate([ensemble.predict(obs, deterministic=False)[0] for _ in range(40)])  # 640 draws
    assert abs(np.mean(sampled == 0) - 0.3) < 0.07 and abs(np.mean(sampled == 2) - 0.28) < 0.07
    assert isinstance(load_policy(str(tmp_path / "ens"), bundle=tiny_discrete.bundle), ActorCriticEnsemble)

    # Box: the mean of the members' modes
    outputs = ActionHead(WorldModel.load(tiny_box.bundle).action_space).outputs  # means, then stds
    low = _constant_agent(tiny_box, tmp_path / "low", [-3.0] * outputs)
    high = _constant_agent(tiny_box, tmp_path / "high", [1.0] * outputs)
    box = dreamenv.load_agent(save_ensemble(tmp_path / "box", [low, high]))
    obs, _ = dreamenv.make_dream_vec(tiny_box.bundle, 4).reset(seed=0)
    head = box.head
    expected = head.to_env(((torch.tanh(torch.tensor(-3.0)) + torch.tanh(torch.tensor(1.0))) / 2).expand(4, head.outputs // 2))
    np.testing.assert_allclose(box.predict(obs)[0], expected, rtol=1e-6)
    assert all(box.action_space.contains(a) for a in box.predict(obs, deterministic=False)[0])

    with pytest.raises(ValueError, match="at least 2"):
        save_ensemble(tmp_path / "one", [first])
    with pytest.raises(ValueError, match="different bundles"):
        save_ensemble(tmp_path / "mixed", [first, low])
    with pytest.raises(ValueError, match="single actor-critics"):
        save_ensemble(tmp_path / "nested", [tmp_path / "ens", first])
    with pytest.raises(ValueError, match="another world model"):
        dreamenv.load_agent(tmp_path / "ens", bundle=tiny_box.bundle)
