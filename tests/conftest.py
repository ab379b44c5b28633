"""Shared fixtures: the tiny test envs are registered by importing tests.tiny_envs.

Session fixtures build, once per test run, tiny rollout stores of the two tiny pixel envs (Discrete and Box
actions), a tiny world-model bundle trained on each, and a tiny CMA-ES controller for each bundle.
"""
from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest
import torch

import tests.tiny_envs  # noqa: F401  (registers DreamenvTest/* ids)
from tests.tiny_envs import MODULE, PIXELS_BOX_ID, PIXELS_ID

# The test models are tiny: intra-op threads only add overhead, and they oversubscribe the cores badly when
# anything else runs beside the tests (measured here: a dream step 25x slower with 2 threads than with 1).
torch.set_num_threads(1)

TINY_ENVS = {"discrete": PIXELS_ID, "box": PIXELS_BOX_ID}


@pytest.fixture(autouse=True)
def _no_leaked_ray():
    """Shut down a Ray session a test left running (run_tasks(backend="ray") starts one), so the next test's
    ray.init() does not fail with "called ray.init twice"."""
    yield
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()


def tiny_train_config():
    """The smallest useful recipe: V z=4 for one epoch, M with an LSTM of 16 for two epochs."""
    from dreamenv.models.mdnrnn import MDNRNNConfig
    from dreamenv.models.vae import VAEConfig
    from dreamenv.train import TrainConfig

    return TrainConfig(
        vae=VAEConfig(z_dim=4, epochs=1, batch_size=32),
        mdnrnn=MDNRNNConfig(hidden_size=16, epochs=2, seq_len=16, batch_size=8),
    )


def tiny_cmaes_config(generations: int = 2, **settings: Any):
    from dreamenv.agents.controller import CMAESConfig

    return CMAESConfig(population=6, rollouts=2, generations=generations, max_steps=30, **settings)


@dataclass(frozen=True)
class Tiny:
    """One tiny pipeline: rollouts -> bundle (+ its training work dir) -> controller."""

    kind: str  # "discrete" or "box"
    env_id: str  # the registered id of the real (tiny) env, as stored in the bundle
    rollouts: Path
    bundle: Path
    work: Path
    controller: Path


def _build(root: Path, kind: str) -> Tiny:
    from dreamenv.agents.controller import train_controller
    from dreamenv.data.collect import collect
    from dreamenv.train import train_world_model

    env_id = TINY_ENVS[kind]
    rollouts = collect(f"{MODULE}:{env_id}", root / "rollouts.h5", 12, episodes_per_shard=6,
                       backend="serial", progress=False)
    bundle = root / "bundle"
    train_world_model(rollouts, bundle, tiny_train_config(), progress=False)
    controller = root / "controller"
    train_controller(bundle, controller, tiny_cmaes_config(), progress=False)
    return Tiny(kind, env_id, rollouts, bundle, root / "bundle.work", controller)


@pytest.fixture(scope="session")
def tiny_discrete(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """Tiny pipeline over DreamenvTest/TinyPixels-v0 (Discrete(3) actions, 20-step limit)."""
    return _build(tmp_path_factory.mktemp("tiny_discrete"), "discrete")


@pytest.fixture(scope="session")
def tiny_box(tmp_path_factory: pytest.TempPathFactory) -> Tiny:
    """Tiny pipeline over DreamenvTest/TinyPixelsBox-v0 (Box(-1, 1, (2,)) actions)."""
    return _build(tmp_path_factory.mktemp("tiny_box"), "box")


@pytest.fixture(scope="session", params=["discrete", "box"])
def tiny(request: pytest.FixtureRequest) -> Tiny:
    """Each tiny pipeline in turn."""
    return request.getfixturevalue(f"tiny_{request.param}")


@pytest.fixture
def bundle_copy(tiny_discrete: Tiny, tmp_path: Path) -> Path:
    """A private copy of the Discrete bundle, to tamper with."""
    return Path(shutil.copytree(tiny_discrete.bundle, tmp_path / "bundle"))


TINY_V_AND_M = """
[train.vae]
z_dim = 4
epochs = 1
batch_size = 32
[train.mdnrnn]
hidden_size = 16
epochs = 1
seq_len = 16
"""


def tiny_recipe(tmp_path: Path, episodes: int, *, run: str = "", train: str = TINY_V_AND_M, controller: str = "",
                tables: str = "") -> Path:
    """tmp_path/tiny.toml, a tiny pipeline on TinyPixels (run dir tmp_path/run): `episodes` random episodes, the `train`
    tables (V z 4 and M LSTM 16 for one epoch), one CMA-ES generation, two scored episodes; `run` and `controller`
    add lines to those tables, `tables` more tables."""
    recipe = tmp_path / "tiny.toml"
    recipe.write_text(f"""
[run]
env_id = "{MODULE}:DreamenvTest/TinyPixels-v0"
dir = "{tmp_path / 'run'}"
{run}
[collect]
episodes = {episodes}
backend = "serial"
{train}
[controller]
population = 4
rollouts = 2
generations = 1
max_steps = 20
{controller}
[evaluate]
episodes = 2
backend = "serial"
{tables}
""")
    return recipe


def assert_differentiable_step_is_the_dream_step(bundle: Path, gradient_of: Callable[[Any, torch.Tensor], torch.Tensor]) -> None:
    """The autograd step of the dynamics gradient gives the dream core's next state, reward and p(done) from the same
    state, Box actions (2 of them), temperatures and noise, and gradient_of(state, reward) reaches the actions."""
    import numpy as np

    from dreamenv.agents.dynamics import differentiable_step
    from dreamenv.agents.starts import StartStates
    from dreamenv.envs.dream import dream_core
    from dreamenv.worldmodel import WorldModel

    wm = WorldModel.load(bundle)
    core = dream_core(wm)
    rng = np.random.default_rng(0)
    start, _ = StartStates(core, None).draw(16, rng)
    for _ in range(3):  # a few steps in, so the recurrent state is not zero
        start, _, _ = core.step(start, torch.from_numpy(rng.uniform(-1, 1, (16, 2)).astype(np.float32)), 1.0,
                                core.draw_noise(rng, 16))
    start = type(start)(*(x.clone() for x in start))
    actions = torch.from_numpy(rng.uniform(-1, 1, (16, 2)).astype(np.float32))
    tau = torch.from_numpy(rng.uniform(0.5, 1.5, 16).astype(np.float32))
    noise = core.draw_noise(rng, 16)
    expected_state, expected_reward, _ = core.step(start, actions, tau, noise)
    expected_done = core.done_probability(expected_state)
    expected_state = [x.clone() for x in expected_state]  # the core's buffers are reused by the next step

    actions.requires_grad_(True)
    state, reward, done = differentiable_step(wm, start, actions, tau, noise)
    for got, want in zip(state, expected_state):
        np.testing.assert_allclose(got.detach().numpy(), want.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(reward.detach().numpy(), expected_reward, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(done.detach().numpy(), expected_done, rtol=1e-4, atol=1e-6)
    gradient_of(state, reward).backward()
    assert actions.grad is not None and float(actions.grad.abs().sum()) > 0
