"""Is the dream's TakeCover as crowded and as deadly as the game, along a policy's own games and dreams?

    python examples/fireballs_in_view.py VizdoomTakeCover runs/s33/data/heldout-agent.h5 --policy VizdoomTakeCover \
        --algo actor-critic --dreams 50

The store holds the policy's real games (`dreamenv collect ... --policy controller`). For the game's frames (and V's
decoding of them) and for the frames V decodes from the policy's dreams (tau 1.0, up to 2,100 steps), the
table gives the share showing a fireball (TakeCover's fireballs are its only bright yellow pixels) by the step they
come at: the game spawns more imps as it goes on, and a dream that stays calm rates every policy too high. Then, by
how much the policy moved in its last 10 actions, the game's deaths and the dream's (each dream ends when its done is
drawn, as in `dreamenv compare`) per 1000 steps, and M's p(done) summed per 1000 steps along both (teacher-forced
along the game, as `done_along_real_episodes.py` computes it).
"""
import argparse

import numpy as np
import torch

import dreamenv
from done_along_real_episodes import (FIREBALL_IN_VIEW, MOVING_BUCKETS, done_probabilities, fireball_pixels, last_step,
                                      moved)
from dreamenv.compare import load_policy
from dreamenv.data.dataset import open_rollouts
from dreamenv.envs.dream import DreamEnv

STEP_BUCKETS = ((0, 300), (300, 600), (600, 1000), (1000, 2100))
EVERY = 5  # look at every 5th frame


def decoded(world_model: dreamenv.WorldModel, z: np.ndarray) -> np.ndarray:
    """V's decoding of latents (N, z_dim) as uint8 frames."""
    with torch.no_grad():
        frames = world_model.vae.decode(torch.as_tensor(z, dtype=torch.float32))
    return (frames.permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)


def share_by_step(steps: np.ndarray, in_view: np.ndarray) -> list[str]:
    """The share of frames showing a fireball in each of STEP_BUCKETS, as table cells."""
    return [f"{in_view[(steps >= lo) & (steps < hi)].mean():.1%}" if ((steps >= lo) & (steps < hi)).any() else ""
            for lo, hi in STEP_BUCKETS]


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("bundle", help="TakeCover MDN-RNN bundle directory or shipped name")
    parser.add_argument("store", help="the policy's real games (a `dreamenv collect` store)")
    parser.add_argument("--policy", required=True, help="the policy (as `dreamenv compare --policy`)")
    parser.add_argument("--algo", default=None, help="its algo (as `dreamenv compare --algo`)")
    parser.add_argument("--policy-bundle", default=None,
                        help="the bundle the policy learnt in, to play it in another M's dream of the same V and sizes")
    parser.add_argument("--dreams", type=int, default=50)
    args = parser.parse_args()
    wm = dreamenv.load_world_model(args.bundle)
    policy = load_policy(args.policy, args.algo, args.policy_bundle or args.bundle)
    game_steps, game_raw, game_v, game_rows = [], [], [], []
    with open_rollouts(args.store) as store:
        arrays = store.load_arrays()
        bounds, actions, terminated = store.episode_bounds(), arrays["actions"], arrays["terminated"]
        for start, end in bounds:
            frames = store.load_frames(np.arange(start, end))
            look = np.arange(0, end - start, EVERY)
            game_steps.append(look)
            game_raw.append(fireball_pixels(frames[look]) >= FIREBALL_IN_VIEW)
            game_v.append(fireball_pixels(decoded(wm, wm.encode_frames(frames[look]))) >= FIREBALL_IN_VIEW)
            p = done_probabilities(wm, frames, actions[start:end])
            game_rows.append(np.stack([moved(actions[start:end]), p, terminated[start:end]], axis=1))
    env = DreamEnv(args.bundle, temperature=1.0)
    hidden, z_dim = wm.mdnrnn.hidden_size, wm.mdnrnn.z_dim
    dream_steps, dream_v, dream_rows = [], [], []
    for seed in range(args.dreams):
        obs, _ = env.reset(seed=seed)
        latents, taken, p_done, ended = [], [], [], False
        while not ended and len(taken) < env.world_model.max_episode_steps:
            if len(taken) % EVERY == 0:
                latents.append(obs[:z_dim])
            action = int(np.asarray(policy.predict(obs, deterministic=True)[0]).reshape(-1)[0])
            obs, _, ended, _, _ = env.step(action)
            with torch.no_grad():  # the head reads h_{t+1}, the last `hidden` entries of the observation
                p_done.append(torch.sigmoid(wm.mdnrnn.done_head(torch.from_numpy(obs[-hidden:]))).item())
            taken.append(action)
        dream_steps.append(np.arange(len(latents)) * EVERY)
        dream_v.append(fireball_pixels(decoded(wm, np.stack(latents))) >= FIREBALL_IN_VIEW)
        dream_rows.append(np.stack([moved(np.array(taken)), p_done, last_step(len(taken)) * ended], axis=1))
    steps, dream_steps = np.concatenate(game_steps), np.concatenate(dream_steps)
    print(f"{len(bounds)} real games, {args.dreams} dreams; frames showing a fireball, by step")
    print("| steps | " + " | ".join(f"{lo}..{hi - 1}" for lo, hi in STEP_BUCKETS) + " |")
    print("| --- " * (len(STEP_BUCKETS) + 1) + "|")
    for label, step_of, in_view in (("game, the frame", steps, np.concatenate(game_raw)),
                                    ("game, V's decoding", steps, np.concatenate(game_v)),
                                    ("dream, V's decoding", dream_steps, np.concatenate(dream_v))):
        print(f"| {label} | " + " | ".join(share_by_step(step_of, in_view)) + " |")
    game_moved, game_p, deaths = np.concatenate(game_rows).T
    dream_moved, dream_p, dream_deaths = np.concatenate(dream_rows).T
    print("| share of the last 10 actions that moved | game: steps, deaths per 1000 | M along the game: p(done) per 1000 | "
          "dream: steps, deaths per 1000 | M in the dream: p(done) per 1000 |\n| --- | --- | --- | --- | --- |")
    rows = [(f"{low:.2f}..{min(high, 1.0):.2f}", (game_moved >= low) & (game_moved < high),
             (dream_moved >= low) & (dream_moved < high)) for low, high in MOVING_BUCKETS]
    for label, g, d in [*rows, ("all", game_moved >= 0, dream_moved >= 0)]:
        print(f"| {label} | {g.sum()}, {1000 * deaths[g].mean():.2f} | {1000 * game_p[g].mean():.2f} | "
              f"{d.sum()}, {1000 * dream_deaths[d].mean():.2f} | {1000 * dream_p[d].mean():.2f} |")
