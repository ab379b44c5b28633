"""Dream vs real speed, measured in one run: real CarRacing, single dream, vector dream by batch, a CMA-ES generation.

    python benchmarks/speed.py            # the full table (a few minutes on 2 cores)
    python benchmarks/speed.py --quick    # shorter timings

Speed does not depend on training, so the dream here is a freshly initialised world model with the paper's
CarRacing dimensions (z 32, LSTM 256, 5 Gaussians, 3 continuous actions) and a done head that never fires.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import gymnasium as gym
import numpy as np
import torch

from dreamenv.agents.controller import CMAESConfig, LinearController, dream_returns, outputs_to_actions
from dreamenv.data.preprocess import FrameSpec
from dreamenv.envs.dream import DreamEnv
from dreamenv.envs.vector import DreamVectorEnv
from dreamenv.models.mdnrnn import MDNRNN
from dreamenv.models.vae import ConvVAE
from dreamenv.worldmodel import WorldModel

Z, HIDDEN, GAUSSIANS, ACTIONS = 32, 256, 5, 3


def paper_world_model() -> WorldModel:
    """Random-weight V + M with the paper's CarRacing sizes; the done head is silenced so episodes run full length."""
    torch.manual_seed(0)
    mdnrnn = MDNRNN(Z, ACTIONS, HIDDEN, GAUSSIANS)
    with torch.no_grad():
        mdnrnn.done_head.bias.fill_(-100.0)
    space = gym.spaces.Box(np.array([-1, 0, 0], np.float32), np.array([1, 1, 1], np.float32))
    return WorldModel(ConvVAE(Z), mdnrnn, torch.randn(64, Z), "CarRacing-v3", space,
                      FrameSpec(crop=(0, 84, 0, 96)), max_episode_steps=1000)


def timed(fn, min_seconds: float, repeats: int = 3) -> float:
    """Calls of fn per second: the best of `repeats` runs of min_seconds / repeats each (after a warm-up call).

    Best-of-n, as timeit does: on a shared machine the slower runs measure the neighbours, not the code.
    """
    fn()
    rates = []
    for _ in range(repeats):
        calls, start = 0, time.perf_counter()
        while time.perf_counter() - start < min_seconds / repeats:
            fn()
            calls += 1
        rates.append(calls / (time.perf_counter() - start))
    return max(rates)


def real_carracing(seconds: float) -> float:
    env = gym.make("CarRacing-v3")
    env.reset(seed=0)
    action = np.array([0.0, 0.5, 0.0], np.float32)

    def step() -> None:
        _, _, terminated, truncated, _ = env.step(action)
        if terminated or truncated:
            env.reset()

    rate = timed(step, seconds)
    env.close()
    return rate


def single_dream(bundle: str, seconds: float) -> float:
    env = DreamEnv(bundle)
    env.reset(seed=0)
    action = np.array([0.0, 0.5, 0.0], np.float32)
    return timed(lambda: env.step(action), seconds)


def vector_dream(bundle: str, n: int, seconds: float) -> float:
    env = DreamVectorEnv(n, bundle)
    env.reset(seed=0)
    actions = np.tile(np.array([0.0, 0.5, 0.0], np.float32), (n, 1))
    return n * timed(lambda: env.step(actions), seconds)


def cmaes_generation(wm: WorldModel, config: CMAESConfig) -> float:
    """Seconds for one generation: population x rollouts dreams of max_steps, each candidate its own controller."""
    dim = LinearController.num_params(wm.latent_obs_dim, wm.action_space)
    candidates = np.random.default_rng(0).normal(0, 0.1, (config.population, dim)).astype(np.float32)
    weights = candidates[:, : ACTIONS * wm.latent_obs_dim].reshape(-1, ACTIONS, wm.latent_obs_dim)
    biases = candidates[:, ACTIONS * wm.latent_obs_dim :]
    owner = np.repeat(np.arange(config.population), config.rollouts)

    def policy(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        who = owner[rows]
        return outputs_to_actions(np.einsum("nd,nod->no", obs, weights[who]) + biases[who], wm.action_space)

    times = []
    for repeat in range(2):  # best of two, as for the rates
        start = time.perf_counter()
        dream_returns(wm, policy, len(owner), 1.0, np.random.default_rng(repeat), config.max_steps)
        times.append(time.perf_counter() - start)
    return min(times)


def matmul_gflops(seconds: float) -> float:
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024**3 * timed(lambda: torch.mm(a, b), seconds) / 1e9


def dream_step_flops() -> int:
    """Multiply-adds x 2 of one dream step: LSTM cell, MDN + reward + done heads, linear controller."""
    lstm = 2 * (Z + ACTIONS + HIDDEN) * 4 * HIDDEN
    heads = 2 * HIDDEN * (3 * GAUSSIANS * Z + 2)
    controller = 2 * (Z + HIDDEN) * ACTIONS
    return lstm + heads + controller


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter timings")
    parser.add_argument("--batches", default="1,16,64,256,1024,4096", help="vector dream batch sizes")
    args = parser.parse_args()
    seconds = 1.5 if args.quick else 6.0
    wm = paper_world_model()
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory() as tmp:
        bundle = str(wm.save(f"{tmp}/bundle"))
        real = real_carracing(seconds)
        rows.append(("CarRacing-v3, one env", f"{real:,.0f} steps/s", "1x"))
        single = single_dream(bundle, seconds)
        rows.append(("DreamEnv.step, batch 1", f"{single:,.0f} steps/s", f"{single / real:,.0f}x real"))
        best = 0.0
        for n in (int(b) for b in args.batches.split(",")):
            rate = vector_dream(bundle, n, seconds)
            best = max(best, rate)
            rows.append((f"DreamVectorEnv, batch {n}", f"{rate:,.0f} env-steps/s", f"{rate / real:,.0f}x real"))
        config = CMAESConfig(population=64, rollouts=16, max_steps=200 if args.quick else 1000)
        gen = cmaes_generation(wm, config)
        rows.append((f"CMA-ES generation, pop 64 x 16 x {config.max_steps} steps", f"{gen:.1f} s",
                     f"{64 * 16 * config.max_steps / gen:,.0f} env-steps/s"))
        gflops = matmul_gflops(seconds)
        ceiling = gflops * 1e9 / dream_step_flops()
        rows.append(("float32 matmul 1024^2", f"{gflops:.0f} GFLOP/s", ""))
        rows.append((f"FLOP ceiling ({dream_step_flops() / 1e6:.2f} MFLOP per dream step)", f"{ceiling:,.0f} steps/s",
                     f"best vector = {best / ceiling:.0%} of ceiling"))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
          f"python {platform.python_version()}")
    print("| measure | speed | ratio |")
    print("| --- | --- | --- |")
    for name, speed, ratio in rows:
        print(f"| {name} | {speed} | {ratio} |")


if __name__ == "__main__":
    main()
