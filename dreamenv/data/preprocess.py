"""Observation -> 64x64x3 uint8 frame: the one place where per-env crop and resize rules live."""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import gymnasium as gym
import numpy as np
from PIL import Image

FRAME_SIZE = 64

# Per-env crop (top, bottom, left, right) applied before the resize, as in the World Models code:
# CarRacing's bottom 12 rows are the dashboard.
CROPS: dict[str, tuple[int, int, int, int]] = {
    "CarRacing": (0, 84, 0, 96),
}


@dataclass(frozen=True)
class FrameSpec:
    """How to get a frame out of an env's observation and shrink it to size x size x 3 uint8."""

    image_key: str | None = None  # key of the image in a Dict observation (ViZDoom: "screen")
    from_render: bool = False  # take frames from env.render() (render_mode="rgb_array")
    crop: tuple[int, int, int, int] | None = None  # (top, bottom, left, right) in source pixels
    size: int = FRAME_SIZE

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> "FrameSpec":
        crop = data.get("crop")
        return cls(
            image_key=data.get("image_key"),
            from_render=bool(data.get("from_render", False)),
            crop=tuple(crop) if crop is not None else None,
            size=int(data.get("size", FRAME_SIZE)),
        )


def _is_image_space(space: gym.Space) -> bool:
    return (
        isinstance(space, gym.spaces.Box)
        and space.dtype == np.uint8
        and len(space.shape) in (2, 3)
        and min(space.shape[:2]) >= 8
    )


def resolve_crop(env_id: str, crop: str | Sequence[int] = "env") -> tuple[int, int, int, int] | None:
    """The crop box of a crop choice: "env" (the env's rule in CROPS), "none" (the whole frame) or (top, bottom, left, right)."""
    if crop == "env":
        return next((c for name, c in CROPS.items() if name in env_id), None)
    if crop == "none":
        return None
    box = tuple(crop) if not isinstance(crop, str) else ()
    if len(box) != 4 or not all(isinstance(v, (int, np.integer)) and v >= 0 for v in box) or not (
        box[0] < box[1] and box[2] < box[3]
    ):
        raise ValueError(f"crop must be 'env', 'none' or four pixel bounds (top, bottom, left, right) with top < bottom "
                         f"and left < right, got {crop!r}")
    return tuple(int(v) for v in box)


def frame_spec_for(env: gym.Env, from_render: bool = False, crop: str | Sequence[int] = "env") -> FrameSpec:
    """Work out where the image is in `env`'s observations; crop as in resolve_crop (default: the env's rule)."""
    env_id = env.spec.id if env.spec is not None else type(env.unwrapped).__name__
    crop = resolve_crop(env_id, crop)
    if from_render:
        if env.render_mode != "rgb_array":
            raise ValueError(
                f"{env_id}: frames from render need render_mode='rgb_array', got {env.render_mode!r}."
            )
        return FrameSpec(from_render=True, crop=crop)
    space = env.observation_space
    if _is_image_space(space):
        return FrameSpec(crop=crop)
    if isinstance(space, gym.spaces.Dict):
        for key, sub in space.spaces.items():
            if _is_image_space(sub):
                return FrameSpec(image_key=key, crop=crop)
    raise ValueError(
        f"{env_id} has no image observations (observation space {space}). "
        "Use --from-render (from_render=True) to record frames from render_mode='rgb_array'."
    )


def preprocess_frame(image: np.ndarray, spec: FrameSpec) -> np.ndarray:
    """Crop and resize one HxW(x3) uint8 image to spec.size x spec.size x 3 uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)
    elif image.ndim == 3 and image.shape[2] == 1:
        image = np.repeat(image, 3, axis=2)
    elif image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[2] not in (1, 3):
        image = np.moveaxis(image, 0, 2)  # CHW -> HWC
        if image.shape[2] == 1:
            image = np.repeat(image, 3, axis=2)
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 image, got shape {image.shape}")
    if spec.crop is not None:
        top, bottom, left, right = spec.crop
        image = image[top:bottom, left:right]
    if image.shape[:2] != (spec.size, spec.size):
        image = np.array(  # a writable copy, so torch.from_numpy takes it without a warning
            Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).resize(
                (spec.size, spec.size), Image.BILINEAR
            )
        )
    return np.ascontiguousarray(image, dtype=np.uint8)


def extract_frame(obs: Any, env: gym.Env, spec: FrameSpec) -> np.ndarray:
    """The preprocessed frame of one observation (or of env.render() when spec.from_render)."""
    if spec.from_render:
        image = env.render()
    elif spec.image_key is not None:
        image = obs[spec.image_key]
    else:
        image = obs
    return preprocess_frame(image, spec)
