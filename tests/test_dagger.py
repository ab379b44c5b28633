"""DAgger in the dream: a linear controller learns a teacher's actions, resumes, and is refused bad teachers."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import dreamenv.agents.dagger as dagger_module
from dreamenv.agents.controller import ControllerMismatchError, LinearController, dream_returns, load_controller
from dreamenv.agents.dagger import DAggerConfig, teacher_view, train_dagger
from dreamenv.agents.starts import real_start_bank
from dreamenv.cli import main
from dreamenv.compare import compare
from dreamenv.data.dataset import open_rollouts
from dreamenv.envs.spaces import latent_dim
from dreamenv.worldmodel import WorldModel
from tests.conftest import Tiny


def _teacher(tiny: Tiny, root: Path) -> Path:
    """A linear controller with large random weights, bound to the tiny bundle: a teacher a linear student can match."""
    wm = WorldModel.load(tiny.bundle)
    out = 3 if tiny.kind == "discrete" else 2
    rng = np.random.default_rng(7)
    info = {"env_id": wm.env_id, "bundle_fingerprint": wm.fingerprint, "obs_mode": "latent"}
    teacher = LinearController(rng.normal(size=(out, latent_dim(wm, "latent"))) * 3, rng.normal(size=out), wm.action_space, info)
    return teacher.save(root / "teacher")


def _config(teacher: Path, rounds: int) -> DAggerConfig:
    return DAggerConfig(teacher=str(teacher), rounds=rounds, dreams=32, keep_fraction=1.0, fit_steps=300,
                        learning_rate=5e-2, weight_decay=0.0)


def _agreement(tiny: Tiny, student: LinearController, teacher: LinearController) -> float:
    """How closely the student acts as the teacher on dream states the student reaches (fresh seed)."""
    wm = WorldModel.load(tiny.bundle)
    seen: list[np.ndarray] = []

    def policy(obs: np.ndarray, rows: np.ndarray) -> np.ndarray:
        seen.append(obs)
        return student.act(obs)

    dream_returns(wm, policy, 16, 1.0, np.random.default_rng(123))
    obs = np.concatenate(seen)
    if tiny.kind == "discrete":
        assert len(set(teacher.act(obs).tolist())) > 1  # the teacher does not act the same everywhere
        return float((student.act(obs) == teacher.act(obs)).mean())
    return -float(np.abs(student.act(obs) - teacher.act(obs)).mean())


def test_dagger_learns_the_teacher(tiny: Tiny, tmp_path: Path) -> None:
    teacher_dir = _teacher(tiny, tmp_path)
    teacher = load_controller(teacher_dir)
    student = train_dagger(tiny.bundle, tmp_path / "student", _config(teacher_dir, 3), progress=False)
    untrained = LinearController(np.zeros_like(teacher.weight), np.zeros_like(teacher.bias), teacher.action_space)
    if tiny.kind == "discrete":
        assert _agreement(tiny, student, teacher) > 0.9 > _agreement(tiny, untrained, teacher) + 0.2
    else:
        assert _agreement(tiny, student, teacher) > -0.1 > _agreement(tiny, untrained, teacher) + 0.1
    load_controller(tmp_path / "student", tiny.bundle)  # a controller of this bundle, as CMA-ES writes
    history = student.info["history"]
    assert [h["rollouts_by"] for h in history] == ["teacher", "controller", "controller"]
    assert history[-1]["labels"] > history[0]["labels"] > 0  # the labels aggregate over rounds
    assert student.info["dagger"]["teacher"] == str(teacher_dir) and student.info["trained_in"] == "dream"


def test_dagger_resumes(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    teacher_dir = _teacher(tiny_discrete, tmp_path)
    out = tmp_path / "student"
    first = train_dagger(tiny_discrete.bundle, out, _config(teacher_dir, 2), progress=False)
    calls: list[int] = []

    def counting(wm, policy, n, *args, **kwargs):
        calls.append(n)
        return dream_returns(wm, policy, n, *args, **kwargs)

    monkeypatch.setattr(dagger_module, "dream_returns", counting)
    again = train_dagger(tiny_discrete.bundle, out, _config(teacher_dir, 2), progress=False)
    assert calls == [] and np.array_equal(again.weight, first.weight)
    more = train_dagger(tiny_discrete.bundle, out, _config(teacher_dir, 3), progress=False)
    assert calls == [32]  # one more round, not three
    history = json.loads((out / "dagger.json").read_text())["history"]
    assert history[:2] == first.info["history"] and len(history) == 3 == len(more.info["history"])
    assert history[2]["labels"] > history[1]["labels"]  # the first two rounds' labels were read back


def test_dagger_refuses_bad_teachers(tiny_discrete: Tiny, tiny_box: Tiny, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="needs a teacher"):
        DAggerConfig()
    with pytest.raises(ControllerMismatchError, match="another world model|trained for"):
        train_dagger(tiny_discrete.bundle, tmp_path / "x", _config(tiny_box.controller, 1), progress=False)
    with pytest.raises(ValueError, match="keep_fraction"):
        DAggerConfig(teacher="t", keep_fraction=0.0)


def test_dagger_from_the_command_line(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    teacher_dir = _teacher(tiny_discrete, tmp_path)
    recipe = tmp_path / "recipe.toml"
    recipe.write_text("[dagger]\nrounds = 2\nkeep_fraction = 1.0\nfit_steps = 50\n")
    out = tmp_path / "student"
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "dagger", "--teacher", str(teacher_dir),
                 "--teacher-algo", "linear", "--n-envs", "4", "--config", str(recipe), "--out", str(out)]) == 0
    info = load_controller(out, tiny_discrete.bundle).info
    assert info["dagger"]["dreams"] == 4 and len(info["history"]) == 2
    result = compare(out, tiny_discrete.bundle, [1.0], episodes=2, real=False, progress=False)
    assert result["virtual"]["1"]["episodes"] == 2
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "cmaes", "--teacher", str(teacher_dir),
                 "--out", str(tmp_path / "c")]) == 2
    assert "DAgger options" in capsys.readouterr().err
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "dagger", "--teacher", str(teacher_dir),
                 "--timesteps", "5", "--out", str(tmp_path / "d")]) == 2
    assert "--timesteps is a PPO" in capsys.readouterr().err
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "dagger", "--teacher", str(teacher_dir), "--n-envs", "4",
                 "--config", str(recipe), "--real-episodes", "2", "--start-data", str(tiny_discrete.rollouts),
                 "--out", str(tmp_path / "real")]) == 0
    info = load_controller(tmp_path / "real", tiny_discrete.bundle).info
    assert info["dagger"]["real_episodes"] == 2 and info["dagger"]["start_data"] == [str(tiny_discrete.rollouts)]
    assert main(["train-agent", str(tiny_discrete.bundle), "--algo", "cmaes", "--real-episodes", "2",
                 "--out", str(tmp_path / "e")]) == 2
    assert "--real-episodes is an option of dagger" in capsys.readouterr().err


def test_dagger_controller_on_the_cell_state(tiny_discrete: Tiny, tmp_path: Path) -> None:
    """obs_mode "latent_cell": the controller reads [z, c, h], its teacher still [z, h] cut out of it."""
    teacher_dir = _teacher(tiny_discrete, tmp_path)
    config = DAggerConfig(teacher=str(teacher_dir), rounds=1, dreams=4, keep_fraction=1.0, obs_mode="latent_cell")
    student = train_dagger(tiny_discrete.bundle, tmp_path / "student", config, progress=False)
    assert student.obs_mode == "latent_cell" and student.obs_dim == 4 + 16 + 16
    labels = load_file(str(tmp_path / "student" / "dagger" / "round0.safetensors"))
    z, h = labels["obs"][:, :4], labels["obs"][:, 20:]
    np.testing.assert_array_equal(labels["actions"], load_controller(teacher_dir).act(np.concatenate([z, h], axis=1)))
    wm = WorldModel.load(tiny_discrete.bundle)
    with pytest.raises(ValueError, match="cannot give it"):
        teacher_view(labels["obs"][:, :20], "latent", "latent_cell", wm)


def test_dagger_fits_the_teacher_on_real_states(tiny_discrete: Tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """real_episodes: the teacher labels every state of recorded real episodes too, once, and the controller fits them."""
    teacher_dir = _teacher(tiny_discrete, tmp_path)
    teacher = load_controller(teacher_dir)
    wm = WorldModel.load(tiny_discrete.bundle)
    config = DAggerConfig(teacher=str(teacher_dir), rounds=1, dreams=4, keep_fraction=1.0, fit_steps=300,
                          learning_rate=5e-2, weight_decay=0.0, real_episodes=3, start_data=[str(tiny_discrete.rollouts)])
    calls: list[int] = []

    def counting(world_model, episodes, *args, **kwargs):
        calls.append(episodes)
        return real_start_bank(world_model, episodes, *args, **kwargs)

    monkeypatch.setattr(dagger_module, "real_start_bank", counting)
    out = tmp_path / "student"
    student = train_dagger(tiny_discrete.bundle, out, config, progress=False)
    real = load_file(str(out / "dagger" / "real.safetensors"))
    dream = load_file(str(out / "dagger" / "round0.safetensors"))
    with open_rollouts(tiny_discrete.rollouts) as store:
        lengths = sorted(int(end - start) for start, end in store.episode_bounds())
    assert calls == [3] and len(real["obs"]) in {sum(c) for c in itertools.combinations(lengths, 3)}  # every step of 3
    assert real["obs"].shape[1] == latent_dim(wm, "latent")
    np.testing.assert_array_equal(real["actions"], teacher.act(real["obs"]))
    assert student.info["history"][0]["labels"] == len(real["obs"]) + len(dream["obs"])
    assert (student.act(real["obs"]) == teacher.act(real["obs"])).mean() > 0.9
    train_dagger(tiny_discrete.bundle, out, DAggerConfig(**{**config.__dict__, "rounds": 2}), progress=False)
    assert calls == [3]  # a resumed run reads the real labels back
    with pytest.raises(ValueError, match="set real_episodes"):
        DAggerConfig(teacher="t", start_data=["a.h5"])
