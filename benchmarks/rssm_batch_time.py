"""Seconds per RSSM training batch (forward, backward, Adam step) on one thread, and the epoch time it implies.

    OMP_NUM_THREADS=1 python benchmarks/rssm_batch_time.py configs/vizdoom_takecover_rssm.toml [--defaults] [--vae-z N]

Reads the recipe's [train.rssm] table (or, with --defaults, RSSMConfig()'s sizes) and [run] rollouts (for the batch
count; without it, only the time per batch and steps per second) and times random batches: the cost does not depend
on the pixels, or on the latents of an RSSM that sees through a V (--vae-z N: a V of z size N, as --vae-from sets).
"""
import dataclasses
import sys
import time

import numpy as np
import torch

from dreamenv.cli import load_recipe
from dreamenv.data.dataset import EpisodeData, open_rollouts, split_episode_ids
from dreamenv.models.rssm import RSSM, RSSMConfig
from dreamenv.train_rssm import count_batches, rssm_losses

torch.set_num_threads(1)
recipe = load_recipe(sys.argv[1])
c = RSSMConfig() if "--defaults" in sys.argv[2:] else RSSMConfig.from_dict(recipe["train"]["rssm"])
if "--vae-z" in sys.argv:
    c = dataclasses.replace(c, vae_z_dim=int(sys.argv[sys.argv.index("--vae-z") + 1]))
if c.terminal_weight == "balanced":  # train_rssm resolves it from the data; its value costs nothing
    c = dataclasses.replace(c, terminal_weight=1.0)
B, T = c.batch_size, c.seq_len
rng = np.random.default_rng(0)
frames = rng.standard_normal((B * (T + 1), c.vae_z_dim), np.float32) if c.vae_z_dim else \
    rng.integers(0, 256, (B * (T + 1), 64, 64, 3), np.uint8)
ones = torch.ones(B, T)
batch = dict(frame_index=torch.arange(B * (T + 1)).view(B, T + 1), actions=torch.eye(3)[torch.randint(3, (B, T))],
             rewards=ones, dones=0 * ones, step_mask=ones, next_mask=ones)
model = RSSM(c, 3)
trained = [p for p in model.parameters() if p.requires_grad]
opt = torch.optim.Adam(trained, c.learning_rate, eps=c.adam_eps)
times = []
for _ in range(11):
    start = time.perf_counter()
    loss = rssm_losses(model, batch, frames)["loss"]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(trained, c.grad_clip)
    opt.step()
    times.append(time.perf_counter() - start)
seconds = np.mean(times[1:])  # the first batch warms up
print(f"{seconds:.2f} s per batch of {B} x {T} steps, {B * T / seconds:,.0f} steps/s")
if "run" in recipe:
    with open_rollouts(recipe["run"]["rollouts"]) as r:
        bounds = r.episode_bounds()
    ids = split_episode_ids(len(bounds), recipe["train"]["holdout_fraction"], recipe["train"]["seed"])[0]
    n = count_batches([EpisodeData(None, None, np.zeros(e - s), None, None) for s, e in bounds[ids]], c)
    print(f"{seconds:.2f} s per batch x {n} batches per epoch x {c.epochs} epochs = {seconds * n * c.epochs / 60:.0f} min")
