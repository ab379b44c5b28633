"""WorldModel: V + M (or an RSSM) + metadata, saved as a bundle directory (safetensors + manifest.json with hashes, never pickle)."""
from __future__ import annotations

import hashlib
import json
import platform
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file

from dreamenv.data.preprocess import FrameSpec, preprocess_frame
from dreamenv.models.mdnrnn import MDNRNN
from dreamenv.models.rssm import RSSM, RSSMConfig
from dreamenv.models.vae import ConvVAE, frames_to_tensor
from dreamenv.spaces import space_from_json, space_to_json

BUNDLE_FORMAT = "dreamenv-bundle"
BUNDLE_FORMAT_VERSION = 1
MANIFEST = "manifest.json"
WEIGHT_FILES = {
    "mdnrnn": ("vae.safetensors", "mdnrnn.safetensors", "initial_states.safetensors"),
    "rssm": ("rssm.safetensors", "initial_states.safetensors"),
}
MODEL_KINDS = tuple(WEIGHT_FILES)


class BundleError(ValueError):
    """A path that is not a valid bundle, a tampered file, or a bundle this version cannot read."""


def package_version(name: str) -> str:
    """Installed version of a distribution, or 'unknown'."""
    try:
        return version(name)
    except PackageNotFoundError:
        return "unknown"


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def action_dim(space: gym.Space) -> int:
    """Width of an action as M sees it: one-hot for Discrete, flat for Box."""
    if isinstance(space, gym.spaces.Discrete):
        return int(space.n)
    return int(np.prod(space.shape))


@dataclass
class WorldModel:
    """A trained world model with everything needed to dream or to see the real env through it: either V (ConvVAE)
    and M (MDN-RNN), model_kind "mdnrnn", or one RSSM (its own encoder and decoder), model_kind "rssm"."""

    vae: ConvVAE | None
    mdnrnn: MDNRNN | None
    initial_z: torch.Tensor  # (K, z_dim) bank of first-frame latents (V's means, or RSSM posterior modes); reset draws z_0 from it
    env_id: str
    action_space: gym.Space
    frame_spec: FrameSpec
    max_episode_steps: int
    default_temperature: float = 1.0
    info: dict[str, Any] = field(default_factory=dict)  # training data summary, held-out metrics, recipe
    fingerprint: str = ""  # sha256 over the weight files' hashes; ties controllers to this bundle
    rssm: RSSM | None = None

    def __post_init__(self) -> None:
        v_and_m = self.vae is not None and self.mdnrnn is not None and self.rssm is None
        rssm_only = self.rssm is not None and self.vae is None and self.mdnrnn is None
        if not (v_and_m or rssm_only):
            raise ValueError("a WorldModel holds either vae and mdnrnn, or rssm (with vae=None and mdnrnn=None)")
        for module in (self.vae, self.mdnrnn, self.rssm):
            if module is not None:
                module.eval()

    @property
    def model_kind(self) -> str:
        """"mdnrnn" (V + M) or "rssm"."""
        return "rssm" if self.rssm is not None else "mdnrnn"

    @property
    def z_dim(self) -> int:
        """Width of the stochastic latent: V's z, or the RSSM's flattened one-hot categoricals."""
        return self.rssm.z_dim if self.rssm is not None else self.vae.z_dim

    @property
    def hidden_size(self) -> int:
        """Width of the recurrent state: M's LSTM, or the RSSM's GRU."""
        return self.rssm.deter_dim if self.rssm is not None else self.mdnrnn.hidden_size

    @property
    def action_dim(self) -> int:
        """Width of an encoded action."""
        return self.rssm.action_dim if self.rssm is not None else self.mdnrnn.action_dim

    @property
    def latent_obs_dim(self) -> int:
        return self.z_dim + self.hidden_size

    def encode_actions(self, actions: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Batch of env actions -> float (N, action_dim) inputs of M (one-hot for Discrete)."""
        actions = torch.as_tensor(np.asarray(actions))
        if isinstance(self.action_space, gym.spaces.Discrete):
            index = actions.long().reshape(-1) - int(self.action_space.start)
            return torch.nn.functional.one_hot(index, int(self.action_space.n)).float()
        return actions.float().reshape(actions.shape[0], -1)

    def encode_frames(self, frames: np.ndarray) -> torch.Tensor:
        """uint8 (N, 64, 64, 3) frames -> V's mean latents (N, z_dim)."""
        return self.encode_posterior(frames)[0]

    @torch.inference_mode()
    def encode_posterior(self, frames: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 (N, 64, 64, 3) frames -> V's posterior mean and log-variance, each (N, z_dim)."""
        if self.vae is None:
            raise ValueError("an RSSM encodes a frame only together with its recurrent state: use "
                             "dreamenv.envs.real.latent_filter(world_model) to follow real frames")
        return self.vae.encode(frames_to_tensor(frames))

    def encode_image(self, image: np.ndarray) -> torch.Tensor:
        """A raw env image -> (1, z_dim) latent, through this bundle's preprocessing."""
        return self.encode_frames(preprocess_frame(image, self.frame_spec)[None])

    def save(self, path: str | Path) -> Path:
        """Write the bundle directory: weights as safetensors, manifest.json with sha256 of every file."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        if self.rssm is not None:
            tensors = {"rssm.safetensors": self.rssm.state_dict()}
            dims = {"z_dim": self.z_dim, "hidden_size": self.hidden_size, "stoch": self.rssm.config.stoch,
                    "classes": self.rssm.config.classes, "action_dim": self.action_dim}
        else:
            tensors = {"vae.safetensors": self.vae.state_dict(), "mdnrnn.safetensors": self.mdnrnn.state_dict()}
            dims = {"z_dim": self.z_dim, "hidden_size": self.hidden_size, "num_gaussians": self.mdnrnn.num_gaussians,
                    "action_dim": self.action_dim}
        tensors["initial_states.safetensors"] = {"z": self.initial_z}
        for name, state in tensors.items():
            save_file({k: v.detach().contiguous() for k, v in state.items()}, str(path / name))
        hashes = {name: sha256_file(path / name) for name in WEIGHT_FILES[self.model_kind]}
        self.fingerprint = hashlib.sha256(json.dumps(hashes, sort_keys=True).encode()).hexdigest()
        manifest = {
            "format": BUNDLE_FORMAT,
            "format_version": BUNDLE_FORMAT_VERSION,
            "versions": {
                "dreamenv": package_version("dreamenv"),
                "torch": torch.__version__,
                "gymnasium": gym.__version__,
                "python": platform.python_version(),
            },
            "env_id": self.env_id,
            "model_kind": self.model_kind,
            "dims": {**dims, "initial_states": int(self.initial_z.shape[0])},
            "action_space": space_to_json(self.action_space),
            "frame_spec": self.frame_spec.to_json(),
            "max_episode_steps": self.max_episode_steps,
            "default_temperature": self.default_temperature,
            "info": self.info,
            "files": hashes,
        }
        if self.rssm is not None:
            manifest["rssm"] = asdict(self.rssm.config)
        (path / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path, env_id: str | None = None) -> "WorldModel":
        """Read and verify a bundle; env_id, when given, must match the bundle's."""
        path = Path(path)
        manifest = read_manifest(path)
        if env_id is not None and manifest["env_id"] != env_id:
            raise BundleError(
                f"{path} is a world model of {manifest['env_id']}, not of {env_id}: "
                f"use a bundle trained on {env_id} (dreamenv train ...)."
            )
        kind = manifest["model_kind"]
        for name in WEIGHT_FILES[kind]:
            file = path / name
            if not file.is_file():
                raise BundleError(f"{file} is missing: the bundle is incomplete; copy or re-save the whole bundle directory.")
            if sha256_file(file) != manifest["files"].get(name):
                raise BundleError(
                    f"{file} does not match the sha256 in {path / MANIFEST}: the file was altered or damaged; "
                    "restore the bundle from its source."
                )
        dims = manifest["dims"]
        vae = mdnrnn = rssm = None
        if kind == "rssm":
            rssm = RSSM(RSSMConfig.from_dict(manifest["rssm"]), dims["action_dim"])
            rssm.load_state_dict(load_file(str(path / "rssm.safetensors")))
        else:
            vae = ConvVAE(dims["z_dim"])
            vae.load_state_dict(load_file(str(path / "vae.safetensors")))
            mdnrnn = MDNRNN(dims["z_dim"], dims["action_dim"], dims["hidden_size"], dims["num_gaussians"])
            mdnrnn.load_state_dict(load_file(str(path / "mdnrnn.safetensors")))
        initial_z = load_file(str(path / "initial_states.safetensors"))["z"]
        model = cls(
            vae=vae,
            mdnrnn=mdnrnn,
            rssm=rssm,
            initial_z=initial_z,
            env_id=manifest["env_id"],
            action_space=space_from_json(manifest["action_space"]),
            frame_spec=FrameSpec.from_json(manifest["frame_spec"]),
            max_episode_steps=int(manifest["max_episode_steps"]),
            default_temperature=float(manifest["default_temperature"]),
            info=manifest.get("info", {}),
        )
        model.fingerprint = hashlib.sha256(json.dumps(manifest["files"], sort_keys=True).encode()).hexdigest()
        return model


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a bundle directory, with its format checked; raises BundleError naming the cause."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(
            f"{path} is not a dreamenv bundle: no {MANIFEST} in it. "
            "Give the directory written by `dreamenv train`, or a bundled name such as 'VizdoomTakeCover'."
        )
    try:
        manifest = json.loads(manifest_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise BundleError(f"{manifest_path} is not valid JSON ({err}): the bundle is damaged.") from err
    if not isinstance(manifest, dict) or manifest.get("format") != BUNDLE_FORMAT:
        raise BundleError(f"{manifest_path} is not a dreamenv bundle manifest (no format '{BUNDLE_FORMAT}').")
    if manifest.get("format_version", 0) > BUNDLE_FORMAT_VERSION:
        raise BundleError(
            f"{path} has bundle format {manifest.get('format_version')}, newer than this dreamenv "
            f"({package_version('dreamenv')}) reads ({BUNDLE_FORMAT_VERSION}): pip install -U dreamenv."
        )
    if manifest.get("model_kind") not in MODEL_KINDS:
        raise BundleError(
            f"{path} holds a '{manifest.get('model_kind')}' world model, which this dreamenv cannot load "
            f"(it reads {', '.join(MODEL_KINDS)}): pip install -U dreamenv."
        )
    return manifest
