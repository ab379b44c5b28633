"""Train the paper's linear controller with CMA-ES inside the shipped Doom dream, then run it in the real game.

    python examples/train_in_dream.py

Everything below is the public API; `dreamenv controller` and `dreamenv evaluate` do the same from the shell.
"""
import gymnasium as gym
import numpy as np

import dreamenv
from dreamenv.agents.controller import CMAESConfig, train_controller

# 1. CMA-ES in the dream: every candidate x rollout is one row of a batched dream, no game engine runs.
controller = train_controller(
    "VizdoomTakeCover", "runs/example/controller",
    CMAESConfig(population=16, rollouts=4, generations=5, temperature=1.15),
)

# 2. The same controller, unchanged, in the real game seen through the same V + M.
real = gym.make("Real-VizdoomTakeCover-v0")
scores = []
for seed in range(5):
    obs, _ = real.reset(seed=seed)
    done, total = False, 0.0
    while not done:
        action, _ = controller.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = real.step(action)
        total += reward
        done = terminated or truncated
    scores.append(total)
print(f"actual score over {len(scores)} episodes: {np.mean(scores):.0f} +- {np.std(scores):.0f}")
