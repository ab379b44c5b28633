"""Reading the rollout store: validated access to frames and per-step arrays, and torch batches for V and M."""
from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
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
        unique, inverse = np.unique(indices, return_inverse=True)
        breaks = np.flatnonzero(np.diff(unique) != 1) + 1
        runs = [run for run in np.split(unique, breaks) if run.size]
        parts = [self._read(name, slice(int(run[0]), int(run[-1]) + 1)) for run in runs]
        if not parts:
            return self._read(name, slice(0, 0))
        return np.concatenate(parts)[inverse.reshape(-1)]

    def load_arrays(self) -> dict[str, np.ndarray]:
        """actions, rewards, terminated, truncated and episode_starts as numpy arrays."""
        return {name: self._read(name, slice(None)) for name in ARRAYS}

    def split_episodes(self, holdout_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
        """Deterministic disjoint (train, held-out) episode ids; at least one held out when E >= 2."""
        return split_episode_ids(self.num_episodes, holdout_fraction, seed)


def split_episode_ids(num_episodes: int, holdout_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Sorted disjoint (train, held-out) ids of range(num_episodes), shuffled by `seed`."""
    if not 0.0 <= holdout_fraction < 1.0:
        raise ValueError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    held = int(round(num_episodes * holdout_fraction))
    if holdout_fraction > 0 and num_episodes >= 2:
        held = min(max(held, 1), num_episodes - 1)
    order = np.random.default_rng(seed).permutation(num_episodes)
    return np.sort(order[held:]), np.sort(order[:held])


class FrameDataset(torch.utils.data.Dataset):
    """In-memory uint8 frames (N, H, W, 3) served as float CHW tensors in [0, 1]."""

    def __init__(self, frames: np.ndarray) -> None:
        self.frames = frames

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(self.frames[index].transpose(2, 0, 1))).float().div_(255.0)


def iterate_frame_batches(
    frames: np.ndarray, batch_size: int, rng: np.random.Generator, drop_last: bool = False
) -> Iterator[torch.Tensor]:
    """One shuffled pass over uint8 NHWC frames as float32 NCHW batches in [0, 1] (fast path for V)."""
    order = rng.permutation(len(frames))
    stop = len(order) - len(order) % batch_size if drop_last else len(order)
    for begin in range(0, stop, batch_size):
        batch = frames[np.sort(order[begin:begin + batch_size])]
        yield torch.from_numpy(np.ascontiguousarray(batch.transpose(0, 3, 1, 2))).float().div_(255.0)


def sequence_batches(
    latents: list[np.ndarray],
    actions: list[np.ndarray],
    rewards: list[np.ndarray],
    dones: list[np.ndarray],
    seq_len: int,
    batch_size: int,
    rng: np.random.Generator,
) -> Iterator[dict[str, torch.Tensor]]:
    """One shuffled pass over per-episode sequences cut into windows of seq_len, zero-padded, for training M.

    Yields dict: latents (B,L,Z), next_latents (B,L,Z) (z_{t+1}), actions (B,L,...) (int64 if integer
    else float32), rewards (B,L) float32, dones (B,L) float32, mask (B,L) bool (real steps) and
    next_mask (B,L) bool (real steps whose z_{t+1} is stored, i.e. not an episode's last step).
    """
    windows = [
        (e, begin)
        for e, z in enumerate(latents)
        for begin in range(0, len(z), seq_len)
    ]
    order = rng.permutation(len(windows))
    for begin in range(0, len(order), batch_size):
        chosen = [windows[i] for i in order[begin:begin + batch_size]]
        yield _pad_windows(chosen, latents, actions, rewards, dones, seq_len)


def _pad_windows(
    chosen: list[tuple[int, int]],
    latents: list[np.ndarray],
    actions: list[np.ndarray],
    rewards: list[np.ndarray],
    dones: list[np.ndarray],
    seq_len: int,
) -> dict[str, torch.Tensor]:
    """Stack the chosen (episode, start) windows into zero-padded arrays with masks."""
    b = len(chosen)
    z0, a0 = np.asarray(latents[0]), np.asarray(actions[0])
    action_dtype = np.int64 if np.issubdtype(a0.dtype, np.integer) else np.float32
    out = {
        "latents": np.zeros((b, seq_len, *z0.shape[1:]), np.float32),
        "next_latents": np.zeros((b, seq_len, *z0.shape[1:]), np.float32),
        "actions": np.zeros((b, seq_len, *a0.shape[1:]), action_dtype),
        "rewards": np.zeros((b, seq_len), np.float32),
        "dones": np.zeros((b, seq_len), np.float32),
        "mask": np.zeros((b, seq_len), bool),
        "next_mask": np.zeros((b, seq_len), bool),
    }
    for row, (e, start) in enumerate(chosen):
        length = len(latents[e])
        end = min(start + seq_len, length)
        n = end - start
        out["latents"][row, :n] = latents[e][start:end]
        out["actions"][row, :n] = actions[e][start:end]
        out["rewards"][row, :n] = rewards[e][start:end]
        out["dones"][row, :n] = dones[e][start:end]
        out["mask"][row, :n] = True
        n_next = min(end, length - 1) - start
        if n_next > 0:
            out["next_latents"][row, :n_next] = latents[e][start + 1:start + 1 + n_next]
            out["next_mask"][row, :n_next] = True
    return {name: torch.from_numpy(value) for name, value in out.items()}
