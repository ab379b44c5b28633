"""Stable-Baselines3 PPO trained only inside the Doom dream, then run unchanged in the real game and scored in both.

    python examples/ppo_in_dream.py --timesteps 200000 --episodes 20
    python examples/ppo_in_dream.py --start-data runs/starts/takecover-random.h5 --max-steps 100   # from real states

With --start-data (any `dreamenv collect VizdoomTakeCover-v1` store) every dream begins at a state of a real episode,
as Dreamer imagines from replayed states, and --max-steps cuts it into short branches. The same from the shell:
`dreamenv train-agent VizdoomTakeCover --algo ppo --out runs/ppo [--start-data DATA.h5 --max-steps 100]` and
`dreamenv compare VizdoomTakeCover --policy runs/ppo --temperatures 1.0,1.15,1.3`.
"""
import argparse

import gymnasium as gym
from stable_baselines3 import PPO
from stable_baselines3.common.vec_env import VecMonitor

import dreamenv
from dreamenv.agents.starts import real_starts

parser = argparse.ArgumentParser()
parser.add_argument("--timesteps", type=int, default=200_000, help="dream steps to train on")
parser.add_argument("--n-envs", type=int, default=16, help="dreams stepped as one batched torch call")
parser.add_argument("--temperature", type=float, default=1.15, help="dream temperature (the paper's for TakeCover)")
parser.add_argument("--episodes", type=int, default=20, help="scoring episodes in the dream and in the game")
parser.add_argument("--start-data", nargs="+", help="rollout store(s) whose real states the dreams start from")
parser.add_argument("--max-steps", type=int, help="truncate each dream after this many steps (default: the game's 2100)")
parser.add_argument("--out", default="runs/ppo_in_dream", help="where the model, table and plot go")

if __name__ == "__main__":  # the scoring spawns real-game workers, which import this file
    args = parser.parse_args()

    # 1. Train in the dream: M imagines every step, no game engine runs. VecMonitor logs dream episode returns.
    starts = real_starts("VizdoomTakeCover", args.start_data) if args.start_data else None  # None: first frames
    env = VecMonitor(dreamenv.sb3_vec_env("Dream-VizdoomTakeCover-v0", n_envs=args.n_envs, temperature=args.temperature,
                                          starts=starts, max_episode_steps=args.max_steps))
    model = PPO("MlpPolicy", env, n_steps=256, seed=0, verbose=1, device="cpu")
    model.learn(total_timesteps=args.timesteps)
    model.save(f"{args.out}/model.zip")

    # 2. The same model, unchanged, in the real game seen through the same V + M.
    real = gym.make("Real-VizdoomTakeCover-v0")
    assert real.observation_space == model.observation_space and real.action_space == model.action_space
    obs, _ = real.reset(seed=0)
    total, done = 0.0, False
    while not done:
        action, _ = model.predict(obs, deterministic=True)
        obs, reward, terminated, truncated, _ = real.step(action)
        total, done = total + reward, terminated or truncated
    print(f"one real episode (seed 0): return {total:.0f}")

    # 3. Virtual vs actual: episode i uses seed i in the dream and in the game; bootstrap 95% intervals.
    result = dreamenv.compare(model, "VizdoomTakeCover", temperatures=[1.0, args.temperature, 1.3], episodes=args.episodes)
    print(result.markdown())
    print(f"plot: {result.plot(f'{args.out}/compare.png')}")  # needs dreamenv[plot]
