"""DreamEnv and RealEnv: the Gymnasium and SB3 checkers, the shared spaces, step order, seeding, temperature,
done modes, action errors, pickling, registration (own bundles and the shipped ones) and dream -> real transfer."""
from __future__ import annotations

import math
import pickle
import warnings
from pathlib import Path
from typing import Iterator

import gymnasium as gym
import numpy as np
import pytest
import torch
from gymnasium.utils.env_checker import check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import dreamenv
from dreamenv.data.preprocess import preprocess_frame
from dreamenv.envs.dream import DreamEnv
from dreamenv.envs.real import RealEnv
from dreamenv.envs.vector import DreamVectorEnv
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny

# Ids that `import dreamenv` registered (collection runs before any test registers its own).
IMPORT_DREAM_IDS = sorted(k for k in gym.registry if k.startswith("Dream-"))
CHECKPOINTS = Path(dreamenv.__file__).parent / "checkpoints"
SHIPPED = sorted(p.parent.parent.name for p in CHECKPOINTS.glob("*/bundle/manifest.json"))


def _checks(env_factory) -> None:
    """Gymnasium's and SB3's env checkers, each on a fresh env; their advisory warnings are not failures."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for check in (check_env, lambda env: sb3_check_env(env, warn=False)):
            env = env_factory()
            try:
                check(env)
            finally:
                env.close()


def _rollout(env: gym.Env, seed: int, actions: list) -> list[tuple]:
    obs, _ = env.reset(seed=seed)
    trace = [(obs.copy(),)]
    for action in actions:
        obs, reward, terminated, truncated, _ = env.step(action)
        trace.append((obs.copy(), reward, terminated, truncated))
        if terminated or truncated:
            break
    return trace


def _same(a: list[tuple], b: list[tuple]) -> bool:
    return len(a) == len(b) and all(
        all(np.array_equal(x, y) for x, y in zip(sa, sb)) for sa, sb in zip(a, b)
    )


def _actions(space: gym.Space, n: int, seed: int = 0) -> list:
    space = gym.spaces.Discrete(space.n, start=space.start) if isinstance(space, gym.spaces.Discrete) else \
        gym.spaces.Box(space.low, space.high, space.shape, space.dtype)
    space.seed(seed)
    return [space.sample() for _ in range(n)]


# --- checkers and spaces -------------------------------------------------------------------------------------

@pytest.mark.parametrize("obs_mode", ["latent", "latent_cell", "pixels"])
@pytest.mark.parametrize("cls", [DreamEnv, RealEnv])
def test_env_checkers(tiny: Tiny, cls: type, obs_mode: str) -> None:
    _checks(lambda: cls(tiny.bundle, obs_mode=obs_mode, render_mode="rgb_array"))


@pytest.mark.parametrize("obs_mode", ["latent", "latent_cell", "pixels"])
def test_dream_and_real_share_spaces(tiny: Tiny, obs_mode: str) -> None:
    dream = DreamEnv(tiny.bundle, obs_mode=obs_mode, render_mode="rgb_array")
    real = RealEnv(tiny.bundle, obs_mode=obs_mode, render_mode="rgb_array")
    assert dream.observation_space == real.observation_space
    assert dream.action_space == real.action_space == gym.make(tiny.env_id).action_space
    expected = {"latent": (20,), "latent_cell": (36,), "pixels": (64, 64, 3)}[obs_mode]  # z 4 + (c 16) + h 16, or RGB
    assert dream.observation_space.shape == expected
    for env in (dream, real):
        obs, _ = env.reset(seed=0)
        assert obs in env.observation_space
        obs, *_ = env.step(env.action_space.sample())
        assert obs in env.observation_space
        frame = env.render()
        assert frame.dtype == np.uint8 and frame.ndim == 3 and frame.shape[-1] == 3
    assert dream.render().shape == (64, 64, 3)
    real.close()


@pytest.mark.parametrize("cls", [DreamEnv, RealEnv, DreamVectorEnv])
def test_latent_cell_inserts_the_lstm_cell_state(tiny_discrete: Tiny, cls: type) -> None:
    """obs_mode "latent_cell" is concat(z, c, h): the "latent" observation of the same episode with M's cell state
    between z and h; c_0 = 0 and c moves once M has stepped."""
    make = (lambda mode: cls(2, tiny_discrete.bundle, obs_mode=mode)) if cls is DreamVectorEnv else \
        (lambda mode: cls(tiny_discrete.bundle, obs_mode=mode))
    plain, cell = make("latent"), make("latent_cell")
    a, _ = plain.reset(seed=5)
    b, _ = cell.reset(seed=5)
    np.testing.assert_array_equal(b[..., :4], a[..., :4])
    np.testing.assert_array_equal(b[..., 20:], a[..., 4:])
    assert not b[..., 4:20].any()
    moved = False
    for action in (1, 2, 0, 1):
        action = np.full(2, action) if cls is DreamVectorEnv else action
        a, *_ = plain.step(action)
        b, *_ = cell.step(action)
        np.testing.assert_allclose(b[..., :4], a[..., :4], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(b[..., 20:], a[..., 4:], rtol=1e-5, atol=1e-6)
        moved |= bool(np.abs(b[..., 4:20]).max() > 0)
    assert moved
    plain.close()
    cell.close()


def test_real_env_step_order(tiny: Tiny) -> None:
    """RealEnv: z_t = V(frame_t); h_{t+1} = M(z_t, a_t, h_t); reward and flags from the game."""
    real = RealEnv(tiny.bundle)
    game = gym.make(tiny.env_id)
    wm = real.world_model
    obs, _ = real.reset(seed=3)
    frame, _ = game.reset(seed=3)
    z, h, c = wm.encode_image(frame), torch.zeros(1, 16), torch.zeros(1, 16)
    np.testing.assert_allclose(obs, torch.cat([z, h], -1)[0].numpy(), rtol=1e-5, atol=1e-6)
    for action in _actions(real.action_space, 40, seed=1):
        obs, reward, terminated, truncated, _ = real.step(action)
        frame, game_reward, game_terminated, game_truncated, _ = game.step(action)
        with torch.no_grad():
            h, c = wm.mdnrnn.step(z, wm.encode_actions(np.asarray(action)[None]), h, c)
        z = wm.encode_image(frame)
        np.testing.assert_allclose(obs, torch.cat([z, h], -1)[0].numpy(), rtol=1e-4, atol=1e-5)
        assert (reward, terminated, truncated) == (game_reward, game_terminated, game_truncated)
        if terminated or truncated:
            break
    assert terminated or truncated  # the tiny game ends within 30 steps


def test_real_env_sampled_encoding(tiny: Tiny) -> None:
    """encoding="sample": z_t is V's mean plus sigma times a draw of the env's seeded generator; M steps on that z."""
    real = RealEnv(tiny.bundle, encoding="sample")
    game = gym.make(tiny.env_id)
    wm = real.world_model
    actions = _actions(real.action_space, 10, seed=1)
    obs, _ = real.reset(seed=3)
    frame, _ = game.reset(seed=3)
    rng = np.random.default_rng(3)  # what reset(seed=3) seeds np_random with
    h, c = torch.zeros(1, 16), torch.zeros(1, 16)
    for action in actions:
        mu, logvar = wm.encode_posterior(preprocess_frame(frame, wm.frame_spec)[None])
        z = mu + torch.from_numpy(rng.standard_normal(mu.shape, dtype=np.float32)) * torch.exp(0.5 * logvar)
        np.testing.assert_allclose(obs, torch.cat([z, h], -1)[0].numpy(), rtol=1e-4, atol=1e-5)
        assert not np.allclose(obs[: wm.z_dim], mu[0].numpy(), atol=1e-3)  # a draw, not the mean
        with torch.no_grad():
            h, c = wm.mdnrnn.step(z, wm.encode_actions(np.asarray(action)[None]), h, c)
        obs, _, terminated, truncated, _ = real.step(action)
        frame, *_ = game.step(action)
        if terminated or truncated:
            break
    assert _same(_rollout(real, 5, actions), _rollout(RealEnv(tiny.bundle, encoding="sample"), 5, actions))
    with pytest.raises(ValueError, match="encoding must be one of"):
        RealEnv(tiny.bundle, encoding="mode")


# --- the dream: step order, temperature, seeding, done modes -----------------------------------------------

def _expected_dream_step(wm: WorldModel, obs: np.ndarray, action) -> tuple[np.ndarray, np.ndarray, float, float]:
    """From obs = concat(z, h) (with c recomputed by the caller when h = 0): h' = M(z, a, h), the mixture mode."""
    z, h = torch.from_numpy(obs[None, : wm.z_dim]), torch.from_numpy(obs[None, wm.z_dim :])
    with torch.no_grad():
        h2, _ = wm.mdnrnn.step(z, wm.encode_actions(np.asarray(action)[None]), h, torch.zeros_like(h))
        out = wm.mdnrnn.heads(h2)
    mode = out.mu.gather(-1, out.logpi.argmax(-1, keepdim=True)).squeeze(-1)
    return mode[0].numpy(), h2[0].numpy(), float(out.reward[0]), float(torch.sigmoid(out.done_logit[0]))


def test_temperature_per_make_and_between_episodes(tiny: Tiny) -> None:
    env = DreamEnv(tiny.bundle, temperature=0.3, done_mode="threshold", done_threshold=1.0)
    assert env.temperature == 0.3
    assert DreamEnv(tiny.bundle).temperature == env.world_model.default_temperature
    action, z_dim = _actions(env.action_space, 1)[0], env.world_model.z_dim
    # tau = 0, set between episodes: z' is the mode of M's mixture, whatever the seed.
    for seed in (0, 1, 2):
        obs, info = env.reset(seed=seed, options={"temperature": 0.0})
        assert env.temperature == 0.0 and info["temperature"] == 0.0
        mode, h, reward, _ = _expected_dream_step(env.world_model, obs, action)
        obs2, r, *_ = env.step(action)
        np.testing.assert_allclose(obs2[:z_dim], mode, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(obs2[z_dim:], h, rtol=1e-5, atol=1e-6)
        assert r == pytest.approx(reward, abs=1e-6)
    # tau = 1 from the next episode on: z' is a sample around the mixture, no longer the mode.
    obs, info = env.reset(seed=0, options={"temperature": 1.0})
    assert env.temperature == 1.0 and info["temperature"] == 1.0
    mode, h, _, _ = _expected_dream_step(env.world_model, obs, action)
    obs2, *_ = env.step(action)
    assert not np.allclose(obs2[:z_dim], mode)
    np.testing.assert_allclose(obs2[z_dim:], h, rtol=1e-5, atol=1e-6)  # h' does not depend on tau
    # A reset without options keeps the temperature; invalid temperatures are refused.
    env.reset(seed=0)
    assert env.temperature == 1.0
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="temperature"):
            env.reset(options={"temperature": bad})
        with pytest.raises(ValueError, match="temperature"):
            DreamEnv(tiny.bundle, temperature=bad)


@pytest.mark.parametrize("obs_mode", ["latent", "pixels"])
def test_seeding(tiny: Tiny, obs_mode: str) -> None:
    env = DreamEnv(tiny.bundle, obs_mode=obs_mode, temperature=1.0)
    other = DreamEnv(tiny.bundle, obs_mode=obs_mode, temperature=1.0)
    actions = _actions(env.action_space, 25)
    first = _rollout(env, 7, actions)
    assert _same(first, _rollout(env, 7, actions))  # same env, same seed
    assert _same(first, _rollout(other, 7, actions))  # another env, same seed
    assert not _same(first, _rollout(env, 8, actions))  # another seed
    assert len(first) > 1


def _fixed_done(bundle: Path, probability: float) -> WorldModel:
    """A private copy of the world model whose done head always says `probability`."""
    wm = WorldModel.load(bundle)
    with torch.no_grad():
        wm.mdnrnn.done_head.weight.zero_()
        wm.mdnrnn.done_head.bias.fill_(math.log(probability / (1 - probability)))
    return wm


def _termination_rate(env: DreamEnv, steps: int) -> float:
    env.reset(seed=0)
    ends = 0
    for action in _actions(env.action_space, steps):
        _, _, terminated, truncated, _ = env.step(action)
        assert not truncated  # the bare DreamEnv never truncates; TimeLimit does
        if terminated:
            ends += 1
            env.reset()
    return ends / steps


def test_done_modes(tiny_discrete: Tiny) -> None:
    wm = _fixed_done(tiny_discrete.bundle, 0.3)
    assert _termination_rate(DreamEnv(wm, done_mode="threshold"), 100) == 0.0  # 0.3 < 0.5
    assert _termination_rate(DreamEnv(wm, done_mode="threshold", done_threshold=0.25), 20) == 1.0
    rate = _termination_rate(DreamEnv(wm, done_mode="sample"), 600)
    assert 0.22 < rate < 0.38  # Bernoulli(0.3): 600 draws, std 0.019
    with pytest.raises(ValueError, match="done_mode"):
        DreamEnv(tiny_discrete.bundle, done_mode="sometimes")


def test_time_limit_from_the_real_env(tiny_discrete: Tiny) -> None:
    env = dreamenv.make_dream(tiny_discrete.bundle, done_mode="threshold", done_threshold=1.0)
    trace = _rollout(env, 0, _actions(env.action_space, 50))
    assert len(trace) - 1 == gym.make(tiny_discrete.env_id).spec.max_episode_steps == 20
    assert trace[-1][3] and not trace[-1][2]  # truncated, not terminated


# --- errors ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [DreamEnv, RealEnv])
def test_bad_actions_raise_helpful_errors(tiny_discrete: Tiny, tiny_box: Tiny, cls: type) -> None:
    discrete, box = cls(tiny_discrete.bundle), cls(tiny_box.bundle)
    discrete.reset(seed=0)
    box.reset(seed=0)
    cases = [
        (discrete, float("nan"), r"NaN"),
        (discrete, 1.0, r"integer in \[0, 2\]"),
        (discrete, 1.5, r"integer in \[0, 2\]"),
        (discrete, 3, r"outside.*\[0, 2\]"),
        (discrete, -1, r"outside"),
        (discrete, [0, 1], r"one integer"),
        (box, np.array([np.nan, 0.0], np.float32), r"NaN"),
        (box, np.zeros(3, np.float32), r"shape \(3,\), expected \(2,\)"),
        (box, 0.5, r"shape \(\), expected \(2,\)"),
        (box, np.array([1.5, 0.0], np.float32), r"outside the bounds"),
        (box, ["a", "b"], r"not numeric"),
    ]
    for env, action, message in cases:
        with pytest.raises(ValueError, match=message):
            env.step(action)
    # The env is still usable after a refused action.
    assert discrete.step(np.int64(2))[0] in discrete.observation_space
    assert box.step(np.array([1.0, -1.0], np.float32))[0] in box.observation_space


@pytest.mark.parametrize("cls", [DreamEnv, RealEnv])
def test_step_before_reset_raises(tiny_discrete: Tiny, cls: type) -> None:
    with pytest.raises(gym.error.ResetNeeded, match="reset"):
        cls(tiny_discrete.bundle).step(0)


def test_bad_constructor_arguments(tiny_discrete: Tiny) -> None:
    with pytest.raises(ValueError, match="obs_mode"):
        DreamEnv(tiny_discrete.bundle, obs_mode="rgb")
    with pytest.raises(ValueError, match="render_mode"):
        DreamEnv(tiny_discrete.bundle, render_mode="human")
    with pytest.raises(ValueError, match="render_mode"):
        RealEnv(tiny_discrete.bundle, render_mode="human")


# --- pickling and registration ------------------------------------------------------------------------------

@pytest.mark.parametrize("cls", [DreamEnv, RealEnv])
def test_envs_pickle(tiny: Tiny, cls: type) -> None:
    env = cls(tiny.bundle, obs_mode="latent")
    env.reset(seed=0)
    copy = pickle.loads(pickle.dumps(env))
    assert type(copy) is cls and copy.observation_space == env.observation_space
    actions = _actions(env.action_space, 10)
    assert _same(_rollout(env, 5, actions), _rollout(copy, 5, actions))


@pytest.fixture
def registered(tiny: Tiny) -> Iterator[tuple[str, str]]:
    """Dream-/Real- ids of a tiny bundle, removed from the registry afterwards."""
    name = f"Tiny{tiny.kind.capitalize()}Test"
    ids = dreamenv.register_bundle(tiny.bundle, name)
    yield ids
    for env_id in ids:
        gym.registry.pop(env_id, None)


def test_register_bundle_and_make(tiny: Tiny, registered: tuple[str, str]) -> None:
    dream_id, real_id = registered
    name = f"Tiny{tiny.kind.capitalize()}Test"
    assert registered == (f"Dream-{name}-v0", f"Real-{name}-v0")
    limit = gym.make(tiny.env_id).spec.max_episode_steps or 1000
    dream, real = gym.make(dream_id), gym.make(real_id)
    for env_id, env in ((dream_id, dream), (real_id, real)):
        assert env.spec.max_episode_steps == limit
        _checks(lambda env_id=env_id: gym.make(env_id).unwrapped)
    assert dream.observation_space == real.observation_space and dream.action_space == real.action_space
    assert gym.make(dream_id, temperature=0.7).unwrapped.temperature == 0.7  # make() kwargs override
    prefixed = gym.make(f"dreamenv:{dream_id}", obs_mode="pixels")
    assert isinstance(prefixed.unwrapped, DreamEnv) and prefixed.observation_space.shape == (64, 64, 3)
    assert gym.spec(dream_id).vector_entry_point is not None
    real.close()


def test_register_bundle_default_name_and_temperature(tiny_discrete: Tiny) -> None:
    ids = dreamenv.register_bundle(tiny_discrete.bundle, temperature=1.25)
    try:
        assert ids == ("Dream-TinyPixels-v0", "Real-TinyPixels-v0")  # from env id DreamenvTest/TinyPixels-v0
        assert gym.make(ids[0]).unwrapped.temperature == 1.25
    finally:
        for env_id in ids:
            gym.registry.pop(env_id, None)


def test_shipped_bundles_are_registered() -> None:
    from dreamenv.registry import shipped_names

    assert shipped_names() == SHIPPED
    for name in SHIPPED:
        for prefix in ("Dream", "Real"):
            spec = gym.spec(f"{prefix}-{name}-v0")
            assert spec.kwargs["bundle"] == name and spec.max_episode_steps >= 1
        assert f"Dream-{name}-v0" in IMPORT_DREAM_IDS


@pytest.mark.parametrize("env_id", IMPORT_DREAM_IDS)
def test_every_dream_id_passes_check_env(env_id: str) -> None:
    env = gym.make(env_id)
    assert isinstance(env.unwrapped, DreamEnv) and env.spec.max_episode_steps >= 1
    _checks(lambda: gym.make(env_id).unwrapped)


@pytest.mark.slow
@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_real_envs_pass_check_env(name: str) -> None:
    dream, real = gym.make(f"Dream-{name}-v0"), gym.make(f"Real-{name}-v0")
    assert dream.observation_space == real.observation_space and dream.action_space == real.action_space
    _checks(lambda: gym.make(f"Real-{name}-v0").unwrapped)
    real.close()


# --- Stable-Baselines3: trained in the dream, run in the real env ------------------------------------------------

def test_sb3_ppo_trains_in_dream_and_runs_in_real_env(tiny: Tiny) -> None:
    from stable_baselines3 import PPO

    dream = dreamenv.make_dream(tiny.bundle)
    model = PPO("MlpPolicy", dream, n_steps=256, batch_size=64, seed=0, device="cpu")
    model.learn(1_000)
    assert model.num_timesteps >= 1_000
    real = dreamenv.make_real(tiny.bundle)
    obs, _ = real.reset(seed=0)
    for _ in range(200):
        action, state = model.predict(obs, deterministic=True)
        assert state is None and action in real.action_space
        obs, _, terminated, truncated, _ = real.step(action)
        if terminated or truncated:
            break
    assert terminated or truncated
    real.close()
