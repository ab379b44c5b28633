"""The linear controller (storage, predict, bundle checks), CMA-ES in the dream (resume), dream_returns, evaluate."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch

import dreamenv.agents.controller as controller_module
from dreamenv.agents.controller import (
    ControllerMismatchError,
    LinearController,
    dream_returns,
    load_controller,
    train_controller,
)
from dreamenv.agents.starts import StartStates, real_start_bank
from dreamenv.cli import main
from dreamenv.compare import compare
from dreamenv.data.collect import collect
from dreamenv.data.dataset import open_rollouts
from dreamenv.envs.dream import dream_core
from dreamenv.evaluate import evaluate, format_table
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny, tiny_cmaes_config
from tests.tiny_envs import MODULE


def _space(tiny: Tiny) -> gym.Space:
    return gym.make(tiny.env_id).action_space


def test_save_load_round_trip(tiny: Tiny, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    space = _space(tiny)
    out = 3 if tiny.kind == "discrete" else 2
    ctrl = LinearController(rng.normal(size=(out, 20)), rng.normal(size=out), space, {"note": "hi", "x": [1, 2]})
    ctrl.save(tmp_path / "c")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["controller.json", "controller.safetensors"]
    back = LinearController.load(tmp_path / "c")
    np.testing.assert_array_equal(back.weight, ctrl.weight)
    np.testing.assert_array_equal(back.bias, ctrl.bias)
    assert back.action_space == space and back.info == ctrl.info and back.obs_dim == 20
    obs = rng.normal(size=(16, 20)).astype(np.float32)
    np.testing.assert_array_equal(back.act(obs), ctrl.act(obs))


def test_trained_controller_files_never_pickle(tiny: Tiny) -> None:
    names = sorted(p.name for p in tiny.controller.iterdir())
    assert names == ["cmaes.json", "controller.json", "controller.safetensors"]
    meta = json.loads((tiny.controller / "controller.json").read_text())
    assert meta["info"]["env_id"] == tiny.env_id and meta["info"]["trained_in"] == "dream"
    assert len(meta["info"]["history"]) == tiny_cmaes_config().generations


def test_load_errors(tmp_path: Path, tiny_discrete: Tiny) -> None:
    with pytest.raises(FileNotFoundError, match="neither a controller directory nor a shipped controller"):
        load_controller(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match="controller.json"):
        load_controller(tmp_path)  # exists, but holds no controller
    shutil.copytree(tiny_discrete.controller, tmp_path / "newer")
    meta = json.loads((tmp_path / "newer" / "controller.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "newer" / "controller.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="v99"):
        load_controller(tmp_path / "newer")


def test_predict_in_action_space(tiny: Tiny) -> None:
    ctrl = load_controller(tiny.controller, tiny.bundle)
    space = _space(tiny)
    rng = np.random.default_rng(1)
    obs = rng.normal(size=20).astype(np.float32) * 3
    action, state = ctrl.predict(obs)
    assert state is None and action in space
    batch = rng.normal(size=(50, 20)).astype(np.float32) * 3
    actions, _ = ctrl.predict(batch, deterministic=True)
    assert actions.shape == (50, *space.shape)
    assert all(a in space for a in actions)
    np.testing.assert_array_equal(actions[7], ctrl.predict(batch[7])[0])
    raw = batch @ ctrl.weight.T + ctrl.bias
    if tiny.kind == "discrete":
        np.testing.assert_array_equal(actions, raw.argmax(1))
    else:  # tanh squashed into [low, high]: the sign and order of each output are kept
        np.testing.assert_array_equal(np.sign(actions), np.sign(raw))
        for k in range(2):
            assert np.all(np.diff(actions[np.argsort(raw[:, k]), k]) >= 0)  # monotone in each output
    with pytest.raises(ValueError, match="features"):
        ctrl.act(np.zeros(21, np.float32))


def test_box_outputs_reach_the_bounds() -> None:
    space = gym.spaces.Box(np.array([-2.0, 0.0], np.float32), np.array([2.0, 1.0], np.float32))
    ctrl = LinearController(np.zeros((2, 3)), np.array([50.0, -50.0]), space)
    np.testing.assert_allclose(ctrl.act(np.zeros(3)), [2.0, 0.0])
    ctrl.bias[:] = 0
    np.testing.assert_allclose(ctrl.act(np.zeros(3)), [0.0, 0.5])


def test_controller_of_another_world_model_is_refused(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    load_controller(tiny_discrete.controller, tiny_discrete.bundle)  # its own bundle: fine
    with pytest.raises(ControllerMismatchError, match=f"trained for {tiny_discrete.env_id}.*{tiny_box.env_id}"):
        load_controller(tiny_discrete.controller, tiny_box.bundle)
    # Same env and shapes, other weights: the bundle fingerprint tells them apart.
    wm = WorldModel.load(tiny_discrete.bundle)
    with torch.no_grad():
        wm.mdnrnn.reward_head.bias.add_(1.0)
    wm.save(tmp_path / "retrained")
    with pytest.raises(ControllerMismatchError, match="another world model"):
        load_controller(tiny_discrete.controller, tmp_path / "retrained")
    with pytest.raises(ControllerMismatchError):
        evaluate(tmp_path / "retrained", tiny_discrete.controller, episodes=1, real=False)


# --- CMA-ES ---------------------------------------------------------------------------------------------------

def test_cmaes_starts_from_a_controller_of_another_bundle(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    """init_from: the first mean is a saved controller's (W, b), even one trained on another M of the env."""
    wm = WorldModel.load(tiny_discrete.bundle)
    with torch.no_grad():
        wm.mdnrnn.reward_head.bias.add_(1.0)
    wm.save(tmp_path / "retrained")
    source = load_controller(tiny_discrete.controller)
    config = tiny_cmaes_config(generations=1, sigma0=1e-9, init_from=str(tiny_discrete.controller))
    warm = train_controller(tmp_path / "retrained", tmp_path / "warm", config, progress=False)
    assert np.abs(source.weight).max() > 1e-3
    np.testing.assert_allclose(warm.weight, source.weight, atol=1e-6)
    np.testing.assert_allclose(warm.bias, source.bias, atol=1e-6)
    assert warm.info["cmaes"]["init_from"] == str(tiny_discrete.controller)
    load_controller(tmp_path / "warm", tmp_path / "retrained")  # bound to the bundle it was trained in
    cold = train_controller(tmp_path / "retrained", tmp_path / "cold", tiny_cmaes_config(generations=1, sigma0=1e-9), progress=False)
    assert np.abs(cold.weight).max() < 1e-6  # without init_from CMA-ES starts from zero

    with pytest.raises(ValueError, match=f"init_from .*{tiny_box.env_id}.*but CMA-ES here needs {tiny_discrete.env_id}"):
        train_controller(tiny_discrete.bundle, tmp_path / "x", tiny_cmaes_config(init_from=str(tiny_box.controller)), progress=False)
    with pytest.raises(ValueError, match="'latent' features.*'latent_cell' features"):
        train_controller(tiny_discrete.bundle, tmp_path / "y", tiny_cmaes_config(obs_mode="latent_cell",
                                                                                 init_from=str(tiny_discrete.controller)), progress=False)
    assert not (tmp_path / "x" / "cmaes.json").exists()

def test_cmaes_on_the_cell_state(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """obs_mode "latent_cell": the controller reads [z, c, h], records it, and every tool shows it that observation."""
    config = controller_module.CMAESConfig(**{**vars(tiny_cmaes_config()), "obs_mode": "latent_cell"})
    ctrl = train_controller(tiny_discrete.bundle, tmp_path / "c", config, progress=False)
    assert ctrl.obs_dim == 4 + 16 + 16 and ctrl.obs_mode == "latent_cell"
    loaded = load_controller(tmp_path / "c", tiny_discrete.bundle)
    assert loaded.obs_mode == "latent_cell" and loaded.obs_dim == 36
    result = compare(tmp_path / "c", tiny_discrete.bundle, [1.0], episodes=2, real=False, progress=False)
    assert result["obs_mode"] == "latent_cell" and result["virtual"]["1"]["episodes"] == 2
    with pytest.raises(ValueError, match="obs_mode 'latent_cell'"):
        compare(tmp_path / "c", tiny_discrete.bundle, [1.0], episodes=1, real=False, obs_mode="latent", progress=False)
    with pytest.raises(ValueError, match="obs_mode 'latent_cell'"):
        loaded.predict(np.zeros(20, np.float32))
    rollouts = collect(f"{MODULE}:{tiny_discrete.env_id}", tmp_path / "ctrl.h5", 2, policy="controller",
                       controller=str(tmp_path / "c"), bundle=str(tiny_discrete.bundle), backend="serial", progress=False)
    with open_rollouts(rollouts) as store:
        assert store.num_episodes == 2
    gif = tmp_path / "dream.gif"
    assert main(["dream", str(tiny_discrete.bundle), "--controller", str(tmp_path / "c"), "--out", str(gif), "--steps", "3"]) == 0
    with pytest.raises(ValueError, match="obs_mode"):
        controller_module.CMAESConfig(obs_mode="pixels")


def test_cmaes_resumes(tiny: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = Path(shutil.copytree(tiny.controller, tmp_path / "ctrl"))
    before = json.loads((out / "cmaes.json").read_text())
    assert before["generation"] == 2 and len(before["history"]) == 2
    calls: list[int] = []

    def counting(wm, policy, n, *args, **kwargs):
        calls.append(n)
        return dream_returns(wm, policy, n, *args, **kwargs)

    monkeypatch.setattr(controller_module, "dream_returns", counting)
    config = tiny_cmaes_config(generations=3)
    ctrl = train_controller(tiny.bundle, out, config, progress=False)
    assert calls == [config.population * config.rollouts]  # one generation run, not three
    after = json.loads((out / "cmaes.json").read_text())
    assert after["generation"] == 3 and len(after["history"]) == 3
    assert after["history"][:2] == before["history"] and after["history"][2]["generation"] == 3
    assert after["mean"] != before["mean"]
    assert len(ctrl.info["history"]) == 3
    np.testing.assert_allclose(np.concatenate([ctrl.weight.ravel(), ctrl.bias]), after["mean"], rtol=1e-6)
    # Asking for no more generations than done runs nothing and keeps the result.
    calls.clear()
    again = train_controller(tiny.bundle, out, config, progress=False)
    assert calls == [] and np.array_equal(again.weight, ctrl.weight)


def test_cmaes_state_of_another_shape_is_refused(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    out = Path(shutil.copytree(tiny_discrete.controller, tmp_path / "ctrl"))
    with pytest.raises(ValueError, match="another controller shape"):
        train_controller(tiny_box.bundle, out, tiny_cmaes_config(3), progress=False)


def _fixed_done(tiny: Tiny, probability: float) -> WorldModel:
    wm = WorldModel.load(tiny.bundle)
    with torch.no_grad():
        wm.mdnrnn.done_head.weight.zero_()
        wm.mdnrnn.done_head.bias.fill_(math.log(probability / (1 - probability)))
    return wm


def _constant_policy(space: gym.Space):
    action = np.asarray(space.sample())
    seen: list[np.ndarray] = []

    def policy(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        assert obs.shape == (len(rows), 20)
        seen.append(rows.copy())
        return np.repeat(action[None], len(rows), axis=0)

    return policy, seen


def test_dream_returns_lengths(tiny: Tiny) -> None:
    space = _space(tiny)
    # Always terminating in threshold mode: every dream lasts one step.
    policy, seen = _constant_policy(space)
    returns, lengths = dream_returns(_fixed_done(tiny, 0.999), policy, 8, 1.0, np.random.default_rng(0), 30, "threshold")
    assert lengths.tolist() == [1] * 8 and len(seen) == 1 and np.all(np.isfinite(returns))
    # Never terminating: every dream runs to max_steps, with every row in every call, and never past the episode limit.
    never = _fixed_done(tiny, 0.001)
    policy, seen = _constant_policy(space)
    returns, lengths = dream_returns(never, policy, 8, 1.0, np.random.default_rng(0), 12, "threshold")
    assert lengths.tolist() == [12] * 8 and len(seen) == 12 and all(len(r) == 8 for r in seen)
    policy, seen = _constant_policy(space)
    returns, lengths = dream_returns(never, policy, 8, 1.0, np.random.default_rng(0), never.max_episode_steps + 10, "threshold")
    assert lengths.tolist() == [never.max_episode_steps] * 8
    # Sampled with p = 0.3: lengths are geometric (mean 1 / 0.3, capped at 15); finished rows drop out.
    policy, seen = _constant_policy(space)
    returns, lengths = dream_returns(_fixed_done(tiny, 0.3), policy, 2000, 1.0, np.random.default_rng(0), 15, "sample")
    expected = (1 - 0.7**15) / 0.3
    assert abs(lengths.mean() - expected) < 0.3  # standard error about 0.06
    assert lengths.min() >= 1 and lengths.max() <= 15
    assert all(len(b) <= len(a) and set(b) <= set(a) for a, b in zip(seen, seen[1:]))
    assert [len(r) for r in seen] == [int((lengths > t).sum()) for t in range(len(seen))]


def test_dream_returns_from_real_starts(tiny_discrete: Tiny) -> None:
    """Dreams started mid-episode run max_steps, or to the episode limit when that comes first."""
    never = _fixed_done(tiny_discrete, 0.001)
    starts = StartStates(dream_core(never), real_start_bank(never, 1000, np.random.default_rng(0)))
    _, steps = starts.draw(64, np.random.default_rng(5))  # dream_returns draws its starts first from its generator
    assert steps.max() > 8
    policy, _ = _constant_policy(_space(tiny_discrete))
    _, lengths = dream_returns(never, policy, 64, 1.0, np.random.default_rng(5), 8, "threshold", starts=starts)
    np.testing.assert_array_equal(lengths, np.minimum(8, never.max_episode_steps - steps))


def test_cmaes_from_real_starts(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[StartStates | None] = []

    def recording(wm, policy, n, *args, **kwargs):
        seen.append(args[-1])
        return dream_returns(wm, policy, n, *args, **kwargs)

    monkeypatch.setattr(controller_module, "dream_returns", recording)
    config = controller_module.CMAESConfig(**{**vars(tiny_cmaes_config(1)), "real_starts": True, "real_start_episodes": 3,
                                              "max_steps": 5})
    ctrl = train_controller(tiny_discrete.bundle, tmp_path / "c", config, progress=False)
    assert ctrl.info["cmaes"]["real_starts"] and len(seen) == 1
    assert 3 <= len(seen[0].bank[1]) <= 3 * 20 and seen[0].bank[1].max() > 0  # 3 real episodes, mid-episode states
    wm = WorldModel.load(tiny_discrete.bundle)
    wm.info["data"]["rollouts"] = [str(tmp_path / "gone.h5")]
    with pytest.raises(ValueError, match="real_starts needs the bundle's rollouts.*gone.h5"):
        train_controller(wm.save(tmp_path / "no-data"), tmp_path / "c2", config, progress=False)
    with pytest.raises(ValueError, match="real_start_episodes"):
        controller_module.CMAESConfig(real_start_episodes=0)


def test_dream_returns_sum_the_reward_head(tiny_discrete: Tiny) -> None:
    wm = _fixed_done(tiny_discrete, 0.001)
    with torch.no_grad():  # a reward head that always says 0.25
        wm.mdnrnn.reward_head.weight.zero_()
        wm.mdnrnn.reward_head.bias.fill_(0.25)
    policy, _ = _constant_policy(_space(tiny_discrete))
    returns, lengths = dream_returns(wm, policy, 4, 1.0, np.random.default_rng(0), 12, "threshold")
    np.testing.assert_allclose(returns, 0.25 * 12)


def test_dream_returns_expected_weighs_rewards_by_survival(tiny_discrete: Tiny) -> None:
    wm = _fixed_done(tiny_discrete, 0.3)
    with torch.no_grad():  # reward 1 a step
        wm.mdnrnn.reward_head.weight.zero_()
        wm.mdnrnn.reward_head.bias.fill_(1.0)
    policy, _ = _constant_policy(_space(tiny_discrete))
    # No death is drawn: every dream earns 1 + 0.7 + ... + 0.7^9, the mean return of sampled dreams capped at 10 steps.
    returns, lengths = dream_returns(wm, policy, 4, 1.0, np.random.default_rng(0), 10, "expected")
    np.testing.assert_allclose(returns, (1 - 0.7**10) / 0.3, rtol=1e-5)
    assert lengths.tolist() == [10] * 4
    # Without a cap, a dream stops once its chance of being alive is below ALIVE_FLOOR (0.7^13 < 0.01 < 0.7^12).
    returns, lengths = dream_returns(wm, policy, 4, 1.0, np.random.default_rng(0), None, "expected")
    assert lengths.tolist() == [13] * 4
    np.testing.assert_allclose(returns, (1 - 0.7**13) / 0.3, rtol=1e-5)


def test_dream_returns_per_dream_temperature(tiny_discrete: Tiny) -> None:
    wm = _fixed_done(tiny_discrete, 0.001)  # never ends: every run draws the same noise for the same rows
    policy, _ = _constant_policy(_space(tiny_discrete))

    def run(tau):
        return dream_returns(wm, policy, 8, tau, np.random.default_rng(3), 15, "threshold")[0]

    cold, hot = run(0.3), run(2.0)
    assert not np.allclose(cold, hot)  # the temperature matters for the returns
    mixed = run(np.array([0.3] * 4 + [2.0] * 4))
    np.testing.assert_allclose(mixed[:4], cold[:4], rtol=1e-5)
    np.testing.assert_allclose(mixed[4:], hot[4:], rtol=1e-5)
    # Rows that finish drop out together with their temperatures.
    wm = _fixed_done(tiny_discrete, 0.3)
    scalar = dream_returns(wm, policy, 64, 1.0, np.random.default_rng(1), 40, "sample")
    per_row = dream_returns(wm, policy, 64, np.ones(64), np.random.default_rng(1), 40, "sample")
    np.testing.assert_array_equal(scalar[1], per_row[1])
    np.testing.assert_allclose(scalar[0], per_row[0], rtol=1e-6)
    with pytest.raises(ValueError, match="shape \\(64,\\)"):
        dream_returns(wm, policy, 64, np.ones(3), np.random.default_rng(1), 40)


def test_cmaes_randomised_temperature_and_threshold(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[tuple] = []

    def recording(wm, policy, n, tau, rng, max_steps, done_mode, done_threshold, obs_mode, starts):
        seen.append((np.asarray(tau), done_mode, done_threshold))
        return dream_returns(wm, policy, n, tau, rng, max_steps, done_mode, done_threshold, obs_mode, starts)

    monkeypatch.setattr(controller_module, "dream_returns", recording)
    config = tiny_cmaes_config(generations=2)
    config = controller_module.CMAESConfig(**{**vars(config), "temperature_range": (0.8, 1.4),
                                              "done_mode": "threshold", "done_threshold": 0.2})
    ctrl = train_controller(tiny_discrete.bundle, tmp_path / "c", config, progress=False)
    assert len(seen) == 2
    for tau, mode, threshold in seen:
        assert tau.shape == (config.population * config.rollouts,) and mode == "threshold" and threshold == 0.2
        assert tau.min() >= 0.8 and tau.max() <= 1.4 and tau.std() > 0.05
    assert ctrl.info["temperature"] == [0.8, 1.4] and ctrl.info["cmaes"]["done_mode"] == "threshold"
    with pytest.raises(ValueError, match="done_mode"):
        controller_module.CMAESConfig(done_mode="sometimes")
    assert controller_module.CMAESConfig(done_mode="expected").done_mode == "expected"
    with pytest.raises(ValueError, match="temperature_range"):
        controller_module.CMAESConfig(temperature_range=(1.5, 1.0))


# --- evaluate -------------------------------------------------------------------------------------------------

def test_evaluate_virtual_and_actual(tiny_discrete: Tiny) -> None:
    result = evaluate(tiny_discrete.bundle, tiny_discrete.controller, episodes=3, temperatures=[0.5, 1.0],
                      backend="serial", progress=False)
    assert set(result["virtual"]) == {"0.5", "1"}
    for scores in [*result["virtual"].values(), result["actual"]]:
        assert {"mean", "std", "min", "max"} <= scores.keys() and scores["episodes"] == 3
        assert scores["min"] <= scores["mean"] <= scores["max"] and scores["std"] >= 0
    # The tiny game pays +1 a step and its episode length depends only on the seed (seeds 0, 1, 2).
    lengths = []
    for seed in range(3):
        env = gym.make(tiny_discrete.env_id)
        env.reset(seed=seed)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(0)
            steps, done = steps + 1, terminated or truncated
        lengths.append(steps)
    assert result["actual"]["mean"] == pytest.approx(np.mean(lengths))
    assert result["actual"]["std"] == pytest.approx(np.std(lengths))
    # Seeded: the same call gives the same dream scores.
    again = evaluate(tiny_discrete.bundle, tiny_discrete.controller, episodes=3, temperatures=[0.5, 1.0], real=False)
    assert again["virtual"] == result["virtual"] and "actual" not in again

    table = format_table(result)
    actual = f"{result['actual']['mean']:.1f} +- {result['actual']['std']:.1f}"
    for tau, v in result["virtual"].items():
        assert f"| {tau} | {v['mean']:.1f} +- {v['std']:.1f} | {actual} |" in table
    assert tiny_discrete.env_id in table
    assert "n/a" in format_table(again)


def test_temperature_table_sits_beside_the_papers() -> None:
    from dreamenv.evaluate import format_temperature_table

    score = {"mean": 300.0, "std": 50.0}
    result = {"env_id": "VizdoomTakeCover-v1", "episodes": 100,
              "rows": [{"temperature": 0.7, "virtual": score, "actual": None}, {"temperature": 1.15, "virtual": score, "actual": score}]}
    lines = format_temperature_table(result).splitlines()
    rows = [line for line in lines if line.startswith("| 0.7") or line.startswith("| 1.15")]
    assert rows[1] == "| 1.15 | 300.0 +- 50.0 | 300.0 +- 50.0 | 918 +- 546 | 1092 +- 556 |"
    assert rows[0].startswith("| 0.7 | 300.0 +- 50.0 | n/a |") and "+-" not in rows[0].split("n/a")[1]
    assert len({line.count("|") for line in lines if line.startswith("|")}) == 1  # every row has the same columns
    other = format_temperature_table({**result, "env_id": "CarRacing-v3"})
    assert "1092" not in other
