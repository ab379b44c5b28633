"""DreamVectorEnv: N batched dreams behave exactly like N single DreamEnvs; SB3 adapter; collection and pipeline with a controller."""
from __future__ import annotations

import json
import math
from pathlib import Path

import gymnasium as gym
import h5py
import numpy as np
import pytest
import torch
from gymnasium.vector import AutoresetMode
from safetensors.numpy import load_file

import dreamenv
from dreamenv.agents.starts import StartStates, real_start_bank, real_starts
from dreamenv.envs.dream import DreamEnv, dream_core
from dreamenv.envs.vector import DreamVectorEnv
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny, tiny_recipe
from tests.tiny_envs import MODULE

TEMPERATURES = [0.5, 1.0, 1.15, 1.3]


def _actions(space: gym.Space, rng: np.random.Generator, n: int) -> np.ndarray:
    if isinstance(space, gym.spaces.Discrete):
        return rng.integers(0, space.n, size=n)
    return rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(np.float32)


@pytest.mark.parametrize("mode", [AutoresetMode.NEXT_STEP, AutoresetMode.SAME_STEP])
def test_vector_equals_single_envs(tiny: Tiny, mode: AutoresetMode) -> None:
    limit = 12
    vec = DreamVectorEnv(4, tiny.bundle, temperature=TEMPERATURES, max_episode_steps=limit, autoreset_mode=mode)
    singles = [gym.wrappers.TimeLimit(DreamEnv(tiny.bundle, temperature=t), limit) for t in TEMPERATURES]
    obs, _ = vec.reset(seed=7)
    np.testing.assert_allclose(obs, np.stack([e.reset(seed=7 + i)[0] for i, e in enumerate(singles)]), atol=1e-6)
    rng = np.random.default_rng(0)
    ended = np.zeros(4, bool)
    episode_ends = 0
    for _ in range(60):
        actions = _actions(vec.single_action_space, rng, 4)
        obs, rewards, terminated, truncated, infos = vec.step(actions)
        for i, env in enumerate(singles):
            if mode == AutoresetMode.NEXT_STEP and ended[i]:  # this step only reset env i
                expected, reward, term, trunc = env.reset()[0], 0.0, False, False
            else:
                expected, reward, term, trunc, _ = env.step(actions[i])
                if mode == AutoresetMode.SAME_STEP and (term or trunc):
                    assert infos["_final_obs"][i]
                    np.testing.assert_allclose(infos["final_obs"][i], expected, atol=1e-5)
                    expected = env.reset()[0]
            ended[i] = term or trunc
            np.testing.assert_allclose(obs[i], expected, atol=1e-5)
            assert rewards[i] == pytest.approx(reward, abs=1e-5)
            assert (terminated[i], truncated[i]) == (term, trunc)
        episode_ends += int(np.sum(terminated | truncated))
    assert episode_ends >= 4  # the comparison covered resets, not just one long episode


def test_expected_done_mode_weighs_rewards_by_survival(tiny_discrete: Tiny) -> None:
    """done_mode "expected": no death is drawn; rewards shrink by M's p(continue) each step until the chance of being
    alive is below ALIVE_FLOOR, when the dream terminates (and a new one starts with its full reward)."""
    wm = WorldModel.load(tiny_discrete.bundle)
    with torch.no_grad():  # p(done) = 0.3 everywhere
        wm.mdnrnn.done_head.weight.zero_()
        wm.mdnrnn.done_head.bias.fill_(math.log(0.3 / 0.7))
    kwargs = {"max_episode_steps": 50, "autoreset_mode": AutoresetMode.SAME_STEP}
    expected = DreamVectorEnv(2, wm, done_mode="expected", **kwargs)
    never = DreamVectorEnv(2, wm, done_mode="threshold", done_threshold=0.99, **kwargs)  # the same dreams, never ended
    expected.reset(seed=3)
    never.reset(seed=3)
    for step in range(1, 16):
        actions = np.array([1, 2])
        _, reward, terminated, truncated, _ = expected.step(actions)
        _, base, base_terminated, _, _ = never.step(actions)
        assert not base_terminated.any() and not truncated.any()
        if step <= 13:  # after that a new dream has begun, whose dynamics differ from the never-ended one's
            np.testing.assert_allclose(reward, base * 0.7 ** (step - 1), rtol=1e-4)
        assert terminated.tolist() == [step == 13] * 2  # 0.7^13 < ALIVE_FLOOR = 0.01 < 0.7^12
    with pytest.raises(ValueError, match="done_mode"):
        DreamVectorEnv(2, wm, done_mode="expectation")


def test_real_starts_begin_at_real_states_and_end_at_the_limits(tiny_discrete: Tiny) -> None:
    """With starts, every (re)set dream is a row of the real-start bank; it is truncated after max_episode_steps
    steps, or earlier where the real episode's step plus the dream's would pass the env's limit."""
    wm = WorldModel.load(tiny_discrete.bundle)
    bank = real_start_bank(wm, 1000, np.random.default_rng(0))
    states, steps = bank
    bank_obs = torch.cat([states.z, states.h], -1).numpy()
    vec = DreamVectorEnv(6, wm, done_mode="threshold", done_threshold=1.0, max_episode_steps=4,
                         autoreset_mode=AutoresetMode.SAME_STEP, starts=StartStates(dream_core(wm), bank))
    obs, _ = vec.reset(seed=0)
    rows = [np.flatnonzero(np.abs(bank_obs - o).max(1) < 1e-6) for o in obs]
    assert all(len(r) for r in rows) and len({int(steps[r[0]]) for r in rows}) > 1  # bank rows, from several steps
    rng, lengths, length = np.random.default_rng(1), [], np.zeros(6, np.int64)
    for _ in range(40):
        obs, _, terminated, truncated, infos = vec.step(rng.integers(0, 3, 6))
        length += 1
        assert not terminated.any()  # p(done) never exceeds 1: only the step limits end these dreams
        for i in np.flatnonzero(truncated):
            assert np.abs(bank_obs - obs[i]).max(1).min() < 1e-6  # the next dream starts at a real state again
            lengths.append(int(length[i]))
        length[truncated] = 0
    assert lengths and max(lengths) == 4
    limit = int(steps.max()) + 2  # an env limit that the latest bank states are close to
    wm.max_episode_steps = limit
    late = DreamVectorEnv(64, wm, max_episode_steps=50, done_mode="threshold", done_threshold=1.0,
                          starts=StartStates(dream_core(wm), bank))
    obs, _ = late.reset(seed=2)
    start_steps = np.array([steps[np.abs(bank_obs - o).max(1) < 1e-6].max() for o in obs])
    first_end = np.zeros(64, np.int64)
    for step in range(1, limit + 1):
        _, _, _, truncated, _ = late.step(np.zeros(64, np.int64))
        first_end[truncated & (first_end == 0)] = step
    np.testing.assert_array_equal(first_end, limit - start_steps)  # each ends when its real episode would


def test_sb3_vec_env_of_a_dream_id_takes_real_starts(tiny_discrete: Tiny) -> None:
    dream_id, _ = dreamenv.register_bundle(tiny_discrete.bundle, "TinyStarts")
    starts = real_starts(tiny_discrete.bundle, [tiny_discrete.rollouts], episodes=3)
    venv = dreamenv.sb3_vec_env(dream_id, n_envs=8, starts=starts, max_episode_steps=3, done_mode="threshold",
                                done_threshold=1.0)  # no deaths: only the limits end these dreams
    bank_obs = torch.cat([starts.bank[0].z, starts.bank[0].h], -1).numpy()
    obs = venv.reset()
    assert max(np.abs(bank_obs - o).max(1).min() for o in obs) < 1e-6
    length, lengths = np.zeros(8, np.int64), []
    for _ in range(9):
        _, _, dones, infos = venv.step(np.zeros(8, np.int64))
        length += 1
        lengths += [int(length[i]) for i in np.flatnonzero(dones) if infos[i]["TimeLimit.truncated"]]
        length[dones] = 0
    assert len(lengths) >= 16 and max(lengths) == 3  # branches of 3 steps (fewer where the real episode's limit is near)


def test_make_vec_uses_the_batched_dream(tiny_discrete: Tiny) -> None:
    dream_id, _ = dreamenv.register_bundle(tiny_discrete.bundle, "TinyVec")
    vec = gym.make_vec(dream_id, num_envs=3, temperature=1.2)
    assert isinstance(vec.unwrapped, DreamVectorEnv)
    assert vec.metadata["autoreset_mode"] == AutoresetMode.NEXT_STEP
    obs, _ = vec.reset(seed=0)
    assert obs.shape == (3, *vec.single_observation_space.shape)
    assert vec.unwrapped.max_episode_steps == gym.spec(dream_id).max_episode_steps
    np.testing.assert_allclose(vec.unwrapped.temperature.numpy(), 1.2)


def test_make_dream_vec(tiny_box: Tiny) -> None:
    vec = dreamenv.make_dream_vec(tiny_box.bundle, 5, temperature=0.7, autoreset_mode="SameStep")
    assert isinstance(vec, DreamVectorEnv) and vec.num_envs == 5 and vec.autoreset_mode == AutoresetMode.SAME_STEP
    assert vec.reset(seed=0)[0].shape == (5, *vec.single_observation_space.shape)


def test_vector_actions_are_checked(tiny_discrete: Tiny, tiny_box: Tiny) -> None:
    vec = DreamVectorEnv(2, tiny_discrete.bundle)
    vec.reset(seed=0)
    with pytest.raises(ValueError, match="integers"):
        vec.step(np.array([0.5, 1.0]))
    with pytest.raises(ValueError, match="outside"):
        vec.step(np.array([0, 7]))
    box = DreamVectorEnv(2, tiny_box.bundle)
    box.reset(seed=0)
    with pytest.raises(ValueError, match="NaN"):
        box.step(np.full((2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="shape"):
        box.step(np.zeros((3, 2), np.float32))


def test_partial_reset_and_temperature_option(tiny_discrete: Tiny) -> None:
    vec = DreamVectorEnv(3, tiny_discrete.bundle)
    first, _ = vec.reset(seed=1)
    vec.step(np.zeros(3, np.int64))
    stepped = vec.core.latent_obs(vec._state).copy()
    obs, _ = vec.reset(options={"reset_mask": np.array([True, False, False]), "temperature": [0.1, 0.2, 0.3]})
    np.testing.assert_allclose(obs[1:], stepped[1:])
    assert not np.allclose(obs[0], stepped[0])
    np.testing.assert_allclose(vec.temperature.numpy(), [0.1, 0.2, 0.3])


def test_sb3_vec_env_trains_ppo(tiny_box: Tiny) -> None:
    pytest.importorskip("stable_baselines3")
    from stable_baselines3 import PPO

    venv = dreamenv.sb3_vec_env(str(tiny_box.bundle), n_envs=8, max_episode_steps=10)
    obs = venv.reset()
    assert obs.shape == (8, *venv.observation_space.shape)
    saw_terminal = False
    for _ in range(12):
        obs, rewards, dones, infos = venv.step(np.zeros((8, 2), np.float32))
        for done, info in zip(dones, infos):
            if done:
                saw_terminal = True
                assert info["terminal_observation"].shape == venv.observation_space.shape
                assert "TimeLimit.truncated" in info
    assert saw_terminal
    model = PPO("MlpPolicy", venv, n_steps=32, batch_size=64, n_epochs=1, verbose=0)
    model.learn(512)
    real = dreamenv.make_real(tiny_box.bundle)
    action, _ = model.predict(real.reset(seed=0)[0], deterministic=True)
    assert real.action_space.contains(np.clip(action, -1, 1).astype(np.float32))


def test_collect_with_a_controller(tiny_discrete: Tiny, tmp_path: Path) -> None:
    from dreamenv.data.collect import collect
    from dreamenv.data.dataset import open_rollouts

    out = collect(f"{MODULE}:{tiny_discrete.env_id}", tmp_path / "ctrl.h5", 3, policy="controller",
                  controller=str(tiny_discrete.controller), bundle=str(tiny_discrete.bundle),
                  backend="serial", progress=False)
    with open_rollouts(out) as rollouts:
        assert rollouts.num_episodes == 3
        actions = rollouts.load_arrays()["actions"]
    assert set(np.unique(actions)) <= {0, 1, 2}
    with pytest.raises(ValueError, match="--controller DIR --bundle BUNDLE"):
        collect(f"{MODULE}:{tiny_discrete.env_id}", tmp_path / "x.h5", 1, policy="controller", progress=False)
    with pytest.raises(ValueError, match="differs from the crop None of the controller's bundle"):
        collect(f"{MODULE}:{tiny_discrete.env_id}", tmp_path / "x.h5", 1, policy="controller", crop=(0, 12, 0, 24),
                controller=str(tiny_discrete.controller), bundle=str(tiny_discrete.bundle), progress=False)


def test_pipeline_and_iterate(tmp_path: Path) -> None:
    from dreamenv.cli import main

    recipe = tiny_recipe(tmp_path, 6, tables="""
[iterate]
episodes = 3
backend = "serial"
warm_start = true
mdn_epochs = 1
""")
    assert main(["pipeline", str(recipe)]) == 0
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["actual"]["episodes"] == 2 and result["virtual"]
    manifest = (tmp_path / "run" / "bundle" / "manifest.json").stat().st_mtime_ns
    assert main(["pipeline", str(recipe)]) == 0  # every step is done: nothing is redone
    assert (tmp_path / "run" / "bundle" / "manifest.json").stat().st_mtime_ns == manifest

    assert main(["iterate", str(recipe), "--rounds", "1"]) == 0
    round_bundle = tmp_path / "run" / "round1" / "bundle"
    info = json.loads((round_bundle / "manifest.json").read_text())["info"]
    assert info["data"]["episodes"] == 6 + 3  # the random store plus the controller's round
    assert info["recipe"]["vae_from"] == info["recipe"]["mdnrnn_from"] == str(tmp_path / "run" / "bundle")
    base = json.loads((tmp_path / "run" / "bundle" / "manifest.json").read_text())["files"]
    assert info and json.loads((round_bundle / "manifest.json").read_text())["files"]["vae.safetensors"] == base["vae.safetensors"]
    assert json.loads((tmp_path / "run" / "round1" / "results.json").read_text())["actual"]["episodes"] == 2

    # a chain continued from round 1 by a recipe that extends this one: its own name, seeds and CMA-ES settings
    (tmp_path / "more.toml").write_text(f"""extends = "tiny.toml"
[controller]
temperature_range = [1.0, 1.2]
sigma0 = 1e-9
[iterate]
bundle = "{round_bundle}"
controller = "{tmp_path / 'run' / 'round1' / 'controller'}"
name = "more"
seed = 500
controller_warm_start = true
""")
    assert main(["iterate", str(tmp_path / "more.toml"), "--rounds", "1"]) == 0
    more = tmp_path / "run" / "more1"
    with h5py.File(more / "rollouts.h5", "r") as f:
        assert f.attrs["seed"] == 500 + 10**6 and f.attrs["policy"].startswith("controller:")
    assert json.loads((more / "bundle" / "manifest.json").read_text())["info"]["recipe"]["mdnrnn_from"] == str(round_bundle)
    info = json.loads((more / "controller" / "controller.json").read_text())["info"]
    assert info["temperature"] == [1.0, 1.2] and info["cmaes"]["init_from"] == str(tmp_path / "run" / "round1" / "controller")
    last, warm = (load_file(str(d / "controller.safetensors")) for d in (tmp_path / "run" / "round1" / "controller", more / "controller"))
    assert np.abs(last["weight"]).max() > 1e-3  # CMA-ES from the last round's C, with a step too small to leave it
    np.testing.assert_allclose(warm["weight"], last["weight"], atol=1e-6)


def test_pipeline_one_controller_per_temperature(tmp_path: Path) -> None:
    from dreamenv.cli import main

    recipe = tiny_recipe(tmp_path, 4, controller="""
temperatures = [0.5, 1.3]
done_mode = "threshold"
done_threshold = 0.3
""")
    assert main(["pipeline", str(recipe)]) == 0
    run = tmp_path / "run"
    result = json.loads((run / "results.json").read_text())
    assert [row["temperature"] for row in result["rows"]] == [0.5, 1.3]
    for row in result["rows"]:
        info = json.loads((Path(row["controller"]) / "controller.json").read_text())["info"]
        assert info["temperature"] == row["temperature"] and info["cmaes"]["done_threshold"] == 0.3
        assert row["virtual"]["episodes"] == 2 and row["actual"]["episodes"] == 2
    assert (run / "temperature.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
