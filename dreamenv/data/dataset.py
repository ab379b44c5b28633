"""Reading the rollout store: validated access to frames and per-step arrays, and torch batches for V and M."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gymnasium as gym
import h5py
import numpy as np
import torch

from dreamenv.data.preprocess import FrameSpec
from dreamenv.spaces import space_from_json

try:  # registers the Zstd filter when installed, so zstd shards read
    import hdf5plugin  # noqa: F401
except ImportError:
    pass

DATASETS = ("frames", "actions", "rewards", "terminated", "truncated", "episode_starts")
ARRAYS = ("actions", "rewards", "terminated", "truncated", "episode_starts")
OPTIONAL_ARRAYS = ("game_variables",)  # stored only for envs that report them (VizDoom: health)


def _unreadable(path: Path | str, err: Exception) -> ValueError:
    """The one clear error for a file that is not a usable rollout store."""
    return ValueError(
        f"{path} is not a readable HDF5 rollout file (corrupt or truncated?): {err}. "
        "Re-run `dreamenv collect` with the same arguments to rebuild the missing or broken shards "
        "(delete a broken shard file first)."
    )


def _open_h5(path: Path) -> h5py.File:
    """h5py.File(path, 'r') with the clear error instead of an h5py traceback."""
    try:
        return h5py.File(path, "r")
    except OSError as err:
        raise _unreadable(path, err) from None


def _check_datasets(f: h5py.File, path: Path) -> int:
    """All required datasets present and of one length; returns that length."""
    missing = [name for name in DATASETS if name not in f]
    if missing:
        raise _unreadable(path, KeyError(f"missing datasets {missing}"))
    lengths = {name: len(f[name]) for name in DATASETS}
    if len(set(lengths.values())) != 1:
        raise _unreadable(path, ValueError(f"datasets of unequal lengths {lengths}"))
    return lengths["frames"]


def _check_sources(f: h5py.File, path: Path) -> None:
    """Every shard behind a virtual dataset exists and opens (HDF5 would silently read zeros)."""
    files = {m.file_name for name in DATASETS if f[name].is_virtual for m in f[name].virtual_sources()}
    for name in sorted(files):
        shard = path.parent / name
        if not shard.exists():
            raise ValueError(
                f"{path}: shard file {shard} is missing. Re-run `dreamenv collect` with the same "
                "arguments to collect it again."
            )
        with _open_h5(shard) as g:
            _check_datasets(g, shard)


def open_rollouts(path: str | Path) -> "Rollouts":
    """Open and validate a rollout index (or one shard file)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; create it with `dreamenv collect`.")
    f = _open_h5(path)
    try:
        _check_datasets(f, path)
        _check_sources(f, path)
        return Rollouts(f, path)
    except BaseException:
        f.close()
        raise


def _attr(f: h5py.File, key: str, default: Any = None) -> Any:
    """An attribute as a plain Python value."""
    value = f.attrs.get(key, default)
    if isinstance(value, bytes):
        return value.decode()
    return value.item() if isinstance(value, np.generic) else value


class Rollouts:
    """An open rollout store: metadata, episode bounds and array loaders. Use as a context manager."""

    def __init__(self, f: h5py.File, path: Path) -> None:
        self._file = f
        self.path = path
        self.env_id: str | None = _attr(f, "env_id")
        spec = _attr(f, "frame_spec")
        self.frame_spec: FrameSpec | None = FrameSpec.from_json(json.loads(spec)) if spec else None
        space = _attr(f, "action_space")
        self.action_space: gym.Space | None = space_from_json(json.loads(space)) if space else None
        self.num_steps: int = len(f["frames"])
        self._starts = self._read("episode_starts", slice(None))
        self.num_episodes: int = int(self._starts.sum())

    def __enter__(self) -> "Rollouts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close the HDF5 file."""
        self._file.close()

    def __repr__(self) -> str:
        return f"Rollouts({str(self.path)!r}, env_id={self.env_id!r}, episodes={self.num_episodes}, steps={self.num_steps})"

    def _read(self, name: str, selection: Any) -> np.ndarray:
        """Read from a dataset, turning HDF5 read errors into the clear error."""
        try:
            return self._file[name][selection]
        except OSError as err:
            raise _unreadable(self.path, err) from None

    def episode_bounds(self) -> np.ndarray:
        """(E, 2) int64 [start, end) step indices of every episode, in stored order."""
        starts = np.flatnonzero(self._starts)
        ends = np.append(starts[1:], self.num_steps)
        return np.stack([starts, ends], axis=1).astype(np.int64)

    def load_frames(self, indices: Sequence[int] | np.ndarray | None = None) -> np.ndarray:
        """Frames (N, 64, 64, 3) uint8: all of them, or the rows at `indices` in the given order."""
        if indices is None:
            return self._read("frames", slice(None))
        return self._read_rows("frames", np.asarray(indices, dtype=np.int64))

    def _read_rows(self, name: str, indices: np.ndarray) -> np.ndarray:
        """Rows at arbitrary indices, read as contiguous slices (fast on chunked, virtual data)."""
        if indices.size and (indices.min() < 0 or indices.max() >= self.num_steps):
            raise IndexError(f"indices out of range [0, {self.num_steps})")
        if not indices.size:  # HDF5 cannot select nothing from a virtual dataset
            dataset = self._file[name]
            return np.empty((0, *dataset.shape[1:]), dtype=dataset.dtype)
        unique, inverse = np.unique(indices, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        runs = [run for run in np.split(unique, breaks) if run.size]
        parts = [self._read(name, slice(int(run[0]), int(run[-1]) + 1)) for run in runs]
        return np.concatenate(parts)[inverse.reshape(-1)]

    def load_arrays(self) -> dict[str, np.ndarray]:
        """actions, rewards, terminated, truncated, episode_starts and, if stored, game_variables as numpy arrays."""
        names = ARRAYS + tuple(name for name in OPTIONAL_ARRAYS if name in self._file)
        return {name: self._read(name, slice(None)) for name in names}


def split_episode_ids(num_episodes: int, holdout_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint (train, held-out) ids of range(num_episodes), shuffled by `seed`."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    held = int(round(num_episodes * holdout_fraction))
    if holdout_fraction > 0 and num_episodes >= 2:
        held = min(max(held, 1), num_episodes - 1)
    order = np.random.default_rng(seed).permutation(num_episodes)
    return np.sort(order[held:]), np.sort(order[:held])


def iterate_frame_batches(
    frames: np.ndarray, batch_size: int, seed: int, start: int = 0, index: np.ndarray | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """One shuffled pass over uint8 NHWC frames (or over the ascending rows `index` of them, without copying
    those rows out first) as (batch number, float32 NCHW batch in [0, 1]).

    The order is a function of `seed` alone, so a resumed epoch can skip its first `start` batches.
    """
    rows = np.arange(len(frames)) if index is None else np.asarray(index, dtype=np.int64)
    order = np.random.default_rng(seed).permutation(len(rows))
    for number in range(start, -(-len(order) // batch_size)):
        batch = frames[rows[np.sort(order[number * batch_size : (number + 1) * batch_size])]]
        yield number, torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float().div_(255.0)


@dataclass
class EpisodeData:
    """One episode as a sequence model trains on it: per-step inputs (V's latents for M, or the indices of the
    episode's frames in a frame array for the RSSM), encoded actions, rewards, terminations."""

    mu: np.ndarray | None
    logvar: np.ndarray | None
    actions: np.ndarray
    rewards: np.ndarray
    terminated: np.ndarray
    frame_index: np.ndarray | None = None  # (T,) int64 rows of the episode's frames, for models that read pixels
    hits: np.ndarray | None = None  # (T,) 1.0 where a game variable fell during the step (see hit_flags)


def hit_flags(game_variables: np.ndarray, terminated: np.ndarray) -> np.ndarray:
    """(T,) float32 flags of one episode: 1 where a game variable fell during step t (VizDoom TakeCover: the
    player was hit), from the values seen before each step, and on a last step that ended the episode in a death."""
    fell = (np.diff(np.reshape(game_variables, (len(terminated), -1)), axis=0) < 0).any(axis=-1)
    return np.append(fell, bool(terminated[-1])).astype(np.float32)


def sequence_batches(
    episodes: list[EpisodeData], seq_len: int, batch_size: int, rng: np.random.Generator
) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled pass over episode pieces of at most seq_len steps, grouped by length to limit padding.

    Yields mu and logvar (B, T + 1, z) holding z_t and z_{t+1} (or, for episodes with frame_index, frame_index
    (B, T + 1) int64), actions (B, T, a), rewards and dones (B, T) (and hits, for episodes with them), step_mask
    (real steps) and next_mask (steps whose z_{t+1} is stored: not an episode's last).
    """
    pieces = [(i, s) for i, e in enumerate(episodes) for s in range(0, len(e.actions), seq_len)]
    pieces.sort(key=lambda p: min(len(episodes[p[0]].actions) - p[1], seq_len))
    groups = [pieces[k : k + batch_size] for k in range(0, len(pieces), batch_size)]
    for g in rng.permutation(len(groups)):
        yield _pad_pieces(episodes, groups[g], seq_len)


def _pad_pieces(episodes: list[EpisodeData], group: list[tuple[int, int]], seq_len: int) -> dict[str, torch.Tensor]:
    """Stack (episode, start) pieces into zero-padded arrays with masks."""
    lengths = [min(len(episodes[i].actions) - s, seq_len) for i, s in group]
    steps, rows = max(lengths), len(group)
    a_dim = episodes[0].actions.shape[1]
    out = {
        "actions": np.zeros((rows, steps, a_dim), np.float32),
        "rewards": np.zeros((rows, steps), np.float32),
        "dones": np.zeros((rows, steps), np.float32),
        "step_mask": np.zeros((rows, steps), np.float32),
        "next_mask": np.zeros((rows, steps), np.float32),
    }
    if episodes[0].mu is not None:
        z_dim = episodes[0].mu.shape[1]
        out["mu"] = np.zeros((rows, steps + 1, z_dim), np.float32)
        out["logvar"] = np.full((rows, steps + 1, z_dim), -20.0, np.float32)  # padding: no sampling noise
    if episodes[0].frame_index is not None:
        out["frame_index"] = np.zeros((rows, steps + 1), np.int64)  # padding points at row 0, masked out
    if episodes[0].hits is not None:
        out["hits"] = np.zeros((rows, steps), np.float32)
    for row, ((i, s), length) in enumerate(zip(group, lengths)):
        e = episodes[i]
        stop = s + length
        extra = min(stop + 1, len(e.actions)) - s  # z_{t+1} of the piece's last step, when the episode has it
        if "mu" in out:
            out["mu"][row, :extra] = e.mu[s : s + extra]
            out["logvar"][row, :extra] = e.logvar[s : s + extra]
        if "frame_index" in out:
            out["frame_index"][row, :extra] = e.frame_index[s : s + extra]
        out["actions"][row, :length] = e.actions[s:stop]
        out["rewards"][row, :length] = e.rewards[s:stop]
        out["dones"][row, :length] = e.terminated[s:stop]
        if "hits" in out:
            out["hits"][row, :length] = e.hits[s:stop]
        out["step_mask"][row, :length] = 1.0
        out["next_mask"][row, : extra - 1] = 1.0
    return {name: torch.from_numpy(value) for name, value in out.items()}
