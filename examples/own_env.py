"""Your own env, end to end: collect rollouts, train V + M, and get Dream-/Real- ids for it.

    python examples/own_env.py

Any Gymnasium env with image observations works; for vector observations pass from_render=True
(frames come from render_mode="rgb_array"). Tiny settings so it finishes in a few minutes on a laptop CPU.
"""
import gymnasium as gym

import dreamenv
from dreamenv.data.collect import collect
from dreamenv.models.mdnrnn import MDNRNNConfig
from dreamenv.models.vae import VAEConfig
from dreamenv.train import TrainConfig, train_world_model


def main() -> None:
    rollouts = collect("CartPole-v1", "runs/cartpole/rollouts.h5", episodes=40, from_render=True)
    config = TrainConfig(vae=VAEConfig(z_dim=16, epochs=2), mdnrnn=MDNRNNConfig(hidden_size=64, epochs=10, seq_len=200, batch_size=16))
    train_world_model(rollouts, "runs/cartpole/bundle", config)

    dream_id, real_id = dreamenv.register_bundle("runs/cartpole/bundle", "MyCartPole")
    dream, real = gym.make(dream_id, temperature=1.0), gym.make(real_id)
    assert dream.observation_space == real.observation_space and dream.action_space == real.action_space
    obs, _ = dream.reset(seed=0)
    print(dream_id, real_id, "observation", obs.shape)


if __name__ == "__main__":  # collection runs in spawned worker processes, which import this file
    main()
