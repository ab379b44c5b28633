"""The scoring harness: paired seeds in dream and reality, bootstrap intervals, policies in workers, reports, CLI."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.error import DependencyNotInstalled
from PIL import Image
from stable_baselines3 import PPO

import dreamenv
from dreamenv.agents.controller import ControllerMismatchError, LinearController
from dreamenv.cli import main
from dreamenv.compare import bootstrap_ci, load_policy, markdown_table, save_plot
from dreamenv.evaluate import evaluate, trained_temperature
from tests.conftest import Tiny

PNG = b"\x89PNG\r\n\x1a\n"


def _play(env: gym.Env, policy, seed: int) -> tuple[float, int, np.ndarray]:
    """One episode with predict(obs, deterministic=True): return, length and the one-hot/flat actions taken."""
    obs, _ = env.reset(seed=seed)
    total, actions, done = 0.0, [], False
    while not done:
        action, _ = policy.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = env.step(action)
        total += reward
        actions.append(env.unwrapped.world_model.encode_actions(np.asarray(action)[None])[0].numpy())
        done = terminated or truncated
    return total, len(actions), np.array(actions)


def _game_lengths(env_id: str, seeds: range) -> list[int]:
    """The tiny game's episode lengths: it pays +1 a step and its length depends only on the seed."""
    lengths = []
    for seed in seeds:
        env = gym.make(env_id)
        env.reset(seed=seed)
        steps, done = 0, False
        while not done:
            _, _, terminated, truncated, _ = env.step(env.action_space.sample())
            steps, done = steps + 1, terminated or truncated
        lengths.append(steps)
    return lengths


def always_two(obs: np.ndarray) -> int:
    """A plain callable policy of one observation."""
    assert obs.ndim == 1, "a plain callable gets one observation at a time"
    return 2


def test_dream_episode_i_is_dream_env_reset_with_seed_plus_i(tiny: Tiny) -> None:
    ctrl = LinearController.load(tiny.controller)
    result = dreamenv.compare(ctrl, tiny.bundle, [0.8], episodes=4, seed=11, real=False, progress=False)
    virtual = result["virtual"]["0.8"]
    steps = []
    for i in range(4):
        total, length, actions = _play(dreamenv.make_dream(tiny.bundle, temperature=0.8), ctrl, 11 + i)
        assert virtual["lengths"][i] == length
        assert virtual["scores"][i] == pytest.approx(total, rel=1e-4, abs=1e-4)
        steps.append(actions)
    np.testing.assert_allclose(virtual["action_mean"], np.concatenate(steps).mean(0), atol=1e-6)
    assert virtual["mean"] == pytest.approx(np.mean(virtual["scores"])) and virtual["episodes"] == 4
    assert virtual["mean_length"] == pytest.approx(np.mean(virtual["lengths"]))
    assert virtual["ci95"][0] <= virtual["mean"] <= virtual["ci95"][1]
    assert "actual" not in result and "gap" not in result


def test_real_episode_i_uses_seed_plus_i_and_the_gap_is_paired(tiny_discrete: Tiny) -> None:
    result = dreamenv.compare(always_two, tiny_discrete.bundle, [0.5, 1.3], episodes=5, seed=3, backend="serial", progress=False)
    actual = result["actual"]
    assert actual["lengths"] == _game_lengths(tiny_discrete.env_id, range(3, 8))
    assert actual["scores"] == [float(n) for n in actual["lengths"]]
    for source in [actual, *result["virtual"].values()]:
        assert source["action_mean"] == [0.0, 0.0, 1.0]  # the policy's one action, in the dream and in the game
    assert result["virtual"]["0.5"]["scores"] != result["virtual"]["1.3"]["scores"]  # the temperature reached the dream
    for tau, virtual in result["virtual"].items():
        difference = np.array(virtual["scores"]) - np.array(actual["scores"])
        gap = result["gap"][tau]
        assert gap["mean"] == pytest.approx(difference.mean())
        assert gap["ci95"] == pytest.approx(bootstrap_ci(difference))
    assert json.loads(json.dumps(result)) == result  # JSON-able as it is
    assert result["seed"] == 3 and result["env_id"] == tiny_discrete.env_id and result["policy"] == "always_two"


class Recorder:
    """A callable policy that keeps every observation it is shown."""

    def __init__(self) -> None:
        self.seen: list[np.ndarray] = []

    def __call__(self, obs: np.ndarray) -> int:
        self.seen.append(obs.copy())
        return 2


def test_sampled_encoding_reaches_the_real_episodes(tiny_discrete: Tiny) -> None:
    """encoding="sample": the real episodes show the policy V's posterior draws, the same in any worker; "mean" its means."""
    z_dim = dreamenv.registry.load_world_model(tiny_discrete.bundle).z_dim
    shown = {}
    for encoding in ("mean", "sample"):
        recorder = Recorder()
        result = dreamenv.compare(recorder, tiny_discrete.bundle, [1.0], episodes=3, backend="serial", real=True,
                                  progress=False, encoding=encoding)
        assert result["encoding"] == encoding
        shown[encoding] = np.array(recorder.seen[-result["actual"]["lengths"][-1]:])  # the last real episode
    mean, sample = shown["mean"], shown["sample"]
    assert mean.shape == sample.shape
    assert not np.allclose(mean[:, :z_dim], sample[:, :z_dim], atol=1e-3)  # z: draws, not means
    assert not np.allclose(mean[1:, z_dim:], sample[1:, z_dim:], atol=1e-5)  # and M steps on the draws
    again = dreamenv.compare(always_two, tiny_discrete.bundle, [1.0], episodes=3, backend="process", workers=2,
                             progress=False, encoding="sample")
    assert again["actual"]["lengths"] == _game_lengths(tiny_discrete.env_id, range(3))


class TinyPPO(PPO):
    """PPO under a class path of this module: a worker that reloads it imports this module, which registers the tiny
    game (the process backend's workers would not know it otherwise)."""


def test_sb3_model_reaches_process_workers_as_its_zip(tiny_discrete: Tiny) -> None:
    model = TinyPPO("MlpPolicy", dreamenv.sb3_vec_env(tiny_discrete.bundle, n_envs=2), n_steps=16, batch_size=16, seed=1, device="cpu")
    serial = dreamenv.compare(model, tiny_discrete.bundle, [1.0], episodes=4, backend="serial", progress=False)
    process = dreamenv.compare(model, tiny_discrete.bundle, [1.0], episodes=4, backend="process", workers=1, progress=False)
    assert process["actual"] == serial["actual"]  # same episodes and the same observation-dependent actions
    assert process["virtual"] == serial["virtual"]


class CoinPolicy:
    """Action 2 when deterministic; otherwise an action drawn with torch's generator, as a sampled actor's would be."""

    def predict(self, obs: np.ndarray, deterministic: bool = True) -> tuple[np.ndarray, None]:
        if deterministic:
            return np.full(len(obs), 2), None
        return torch.randint(0, 3, (len(obs),)).numpy(), None


def test_stochastic_compare_samples_and_is_seeded_per_episode(tiny_discrete: Tiny) -> None:
    kwargs = {"temperatures": [1.0], "episodes": 6, "seed": 5, "progress": False}
    mode = dreamenv.compare(CoinPolicy(), tiny_discrete.bundle, backend="serial", **kwargs)
    torch.manual_seed(123)
    sampled = dreamenv.compare(CoinPolicy(), tiny_discrete.bundle, backend="serial", deterministic=False, **kwargs)
    after = torch.rand(4)
    torch.manual_seed(123)
    assert torch.equal(after, torch.rand(4))  # the caller's torch generator is left as it was
    again = dreamenv.compare(CoinPolicy(), tiny_discrete.bundle, backend="process", workers=2, deterministic=False, **kwargs)
    assert mode["actual"]["action_mean"] == [0.0, 0.0, 1.0] and mode["virtual"]["1"]["action_mean"] == [0.0, 0.0, 1.0]
    for source in (sampled["actual"], sampled["virtual"]["1"]):
        assert min(source["action_mean"]) > 0.1  # all three actions were drawn
    assert again["actual"] == sampled["actual"] and again["virtual"] == sampled["virtual"]  # the same draws in any worker
    assert sampled["deterministic"] is False and mode["deterministic"] is True
    assert "actions sampled" in markdown_table(sampled) and "actions sampled" not in markdown_table(mode)


def test_bad_policies_fail_before_any_episode(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    bundle = tiny_discrete.bundle
    with pytest.raises(ValueError, match="cannot be pickled.*backend='serial'"):
        dreamenv.compare(lambda obs: 0, bundle, episodes=2, backend="process", progress=False)
    with pytest.raises(TypeError, match="predict"):
        dreamenv.compare(42, bundle, episodes=2, backend="serial", progress=False)

    class WrongSpace:
        observation_space = gym.spaces.Box(-1, 1, (5,), np.float32)

        def predict(self, obs, deterministic=True):
            return np.zeros(len(obs), np.int64), None

    with pytest.raises(ValueError, match="observation_space .* differs"):
        dreamenv.compare(WrongSpace(), bundle, episodes=2, backend="serial", progress=False)
    with pytest.raises(ControllerMismatchError):
        dreamenv.compare(tiny_box.controller, bundle, episodes=2, backend="serial", progress=False)
    with pytest.raises(ValueError, match="episodes"):
        dreamenv.compare(always_two, bundle, episodes=0)
    with pytest.raises(ValueError, match="temperatures"):
        dreamenv.compare(always_two, bundle, temperatures=[], episodes=2)
    with pytest.raises(ValueError, match="algo='ppo'"):
        load_policy(tmp_path / "model.zip")
    with pytest.raises(ValueError, match="unknown algo"):
        load_policy(tiny_discrete.controller, algo="dreamer")
    with pytest.raises(ValueError, match="outside"):  # an invalid action is the env's clear error
        dreamenv.compare(lambda obs: 7, bundle, episodes=2, real=False, progress=False)


def test_load_policy_finds_controllers(tiny_discrete: Tiny) -> None:
    ctrl = load_policy(tiny_discrete.controller, bundle=tiny_discrete.bundle)
    assert isinstance(ctrl, LinearController)
    assert isinstance(load_policy("VizdoomTakeCover"), LinearController)  # a shipped name


def test_bootstrap_ci() -> None:
    rng = np.random.default_rng(5)
    samples = rng.normal(10.0, 2.0, 400)
    low, high = bootstrap_ci(samples)
    assert low < samples.mean() < high
    assert high - low == pytest.approx(2 * 1.96 * samples.std() / np.sqrt(len(samples)), rel=0.1)  # the normal interval
    assert bootstrap_ci(samples) == [low, high]  # a fixed generator
    assert bootstrap_ci(samples + 3.0) == pytest.approx([low + 3.0, high + 3.0])
    assert bootstrap_ci([4.0] * 7) == [4.0, 4.0]
    skewed = rng.exponential(1.0, 30)
    low, high = bootstrap_ci(skewed)
    assert high - skewed.mean() > skewed.mean() - low  # a percentile interval follows the skew
    with pytest.raises(ValueError, match="at least one"):
        bootstrap_ci([])


def test_markdown_and_plot(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    result = dreamenv.compare(always_two, tiny_discrete.bundle, [0.5, 1.0], episodes=3, backend="serial", progress=False)
    table = result.markdown()
    assert table == markdown_table(result) and tiny_discrete.env_id in table and "seeds 0..2" in table
    actual = result["actual"]
    for tau, v in result["virtual"].items():
        gap = result["gap"][tau]
        row = (f"| {tau} | {v['mean']:.1f} +- {v['std']:.1f} | {actual['mean']:.1f} +- {actual['std']:.1f} | "
               f"[{v['ci95'][0]:.1f}, {v['ci95'][1]:.1f}] | [{actual['ci95'][0]:.1f}, {actual['ci95'][1]:.1f}] | "
               f"{gap['mean']:.1f} [{gap['ci95'][0]:.1f}, {gap['ci95'][1]:.1f}] | (0.00, 0.00, 1.00) / (0.00, 0.00, 1.00) |")
        assert row in table  # always action 2 of Discrete(3): its frequency is 1 in the dream and in the game
    dream_only = dreamenv.compare(always_two, tiny_discrete.bundle, [0.5], episodes=2, real=False, progress=False)
    assert "| n/a | n/a | (0.00, 0.00, 1.00) / n/a |" in dream_only.markdown()

    path = result.plot(tmp_path / "plots" / "compare.png")
    assert path.read_bytes()[:8] == PNG
    with Image.open(path) as image:
        assert image.size[0] > 300 and image.size[1] > 200
    assert save_plot(dream_only, tmp_path / "dream.png").read_bytes()[:8] == PNG
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(DependencyNotInstalled, match='pip install "dreamenv\\[plot\\]"'):
        result.plot(tmp_path / "x.png")


def test_evaluate_is_compare_at_the_controllers_training_settings(tiny_discrete: Tiny) -> None:
    ctrl = LinearController.load(tiny_discrete.controller)
    tau = trained_temperature(ctrl.info, 1.0)
    evaluated = evaluate(tiny_discrete.bundle, tiny_discrete.controller, episodes=3, real=False, progress=False)
    compared = dreamenv.compare(ctrl, tiny_discrete.bundle, [tau], episodes=3, real=False, progress=False)
    assert evaluated["virtual"] == compared["virtual"]
    assert evaluated["controller"] == str(tiny_discrete.controller)


def test_cli_compare_writes_json_markdown_and_plot(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"json": tmp_path / "r.json", "markdown": tmp_path / "r.md", "plot": tmp_path / "r.png"}
    argv = ["compare", str(tiny_discrete.bundle), "--policy", str(tiny_discrete.controller), "--temperatures", "0.5,1.2",
            "--episodes", "3", "--seed", "4", "--backend", "serial", *[f"--{k}={v}" for k, v in files.items()]]
    assert main(argv) == 0
    out = capsys.readouterr().out
    result = json.loads(files["json"].read_text())
    assert set(result["virtual"]) == {"0.5", "1.2"} and result["actual"]["lengths"] == _game_lengths(tiny_discrete.env_id, range(4, 7))
    assert files["markdown"].read_text().strip() in out and "| 1.2 |" in out
    assert files["plot"].read_bytes()[:8] == PNG and result["deterministic"] is True
    assert main([*argv, "--stochastic"]) == 0
    capsys.readouterr()
    assert json.loads(files["json"].read_text())["deterministic"] is False
    assert main(["compare", str(tiny_discrete.bundle), "--policy", str(tmp_path / "nope"), "--no-real"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dreamenv compare: error:") and "nope" in err[0]


def test_real_env_hands_the_game_integer_actions(tiny_discrete: Tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """ViZDoom reads a Discrete action that is a 0-d array as "press every button" (np.issubdtype(type(a), np.integer)
    is False for it): every action the harness plays must reach the game as an integer, as Discrete.sample() gives."""
    real = dreamenv.make_real(tiny_discrete.bundle)
    received = []
    game_step = real.env.step
    monkeypatch.setattr(real.env, "step", lambda action: received.append(action) or game_step(action))
    real.reset(seed=0)
    for action in (2, np.int64(1), np.asarray(2), np.array([0])):
        real.step(action)
    assert [int(a) for a in received] == [2, 1, 2, 0]
    assert all(np.issubdtype(type(a), np.integer) for a in received)
