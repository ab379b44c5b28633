"""Seconds per RSSM training batch (forward, backward, Adam step) on one thread, and the epoch time it implies.

    OMP_NUM_THREADS=1 python benchmarks/rssm_batch_time.py configs/vizdoom_takecover_rssm.toml [--defaults]

Reads the recipe's [train.rssm] table (or, with --defaults, RSSMConfig()'s sizes) and [run] rollouts (for the batch
count) and times random batches: the cost does not depend on the pixels.
"""
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
B, T = c.batch_size, c.seq_len
with open_rollouts(recipe["run"]["rollouts"]) as r:
    bounds = r.episode_bounds()
ids = split_episode_ids(len(bounds), recipe["train"]["holdout_fraction"], recipe["train"]["seed"])[0]
n = count_batches([EpisodeData(None, None, np.zeros(e - s), None, None) for s, e in bounds[ids]], c)
frames, ones = np.random.default_rng(0).integers(0, 256, (B * (T + 1), 64, 64, 3), np.uint8), torch.ones(B, T)
batch = dict(frame_index=torch.arange(B * (T + 1)).view(B, T + 1), actions=torch.eye(3)[torch.randint(3, (B, T))],
             rewards=ones, dones=0 * ones, step_mask=ones, next_mask=ones)
model = RSSM(c, 3)
opt = torch.optim.Adam(model.parameters(), c.learning_rate, eps=c.adam_eps)
times = []
for _ in range(11):
    start = time.perf_counter()
    loss = rssm_losses(model, batch, frames)["loss"]
    opt.zero_grad()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
    opt.step()
    times.append(time.perf_counter() - start)
s = np.mean(times[1:])  # the first batch warms up
print(f"{s:.2f} s per batch x {n} batches per epoch x {c.epochs} epochs = {s * n * c.epochs / 60:.0f} min")
