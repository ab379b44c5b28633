"""The `dreamenv` command line: help, info, clear one-line errors with exit code 2, and each verb on tiny data."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
from PIL import Image

from dreamenv.cli import build_parser, main
from dreamenv.worldmodel import read_manifest
from tests.conftest import Tiny
from tests.tiny_envs import MODULE, VECTOR_ID

VERBS = sorted(build_parser()._subparsers._group_actions[0].choices)


def test_console_script_declared() -> None:
    scripts = {e.name: e.value for e in entry_points(group="console_scripts")}
    assert scripts.get("dreamenv") == "dreamenv.cli:main"


@pytest.mark.parametrize("argv", [["--help"], *[[verb, "--help"] for verb in VERBS]], ids=lambda a: " ".join(a))
def test_help_exits_zero(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: dreamenv")
    if argv == ["--help"]:
        assert all(verb in out for verb in ("collect", "train", "info", "controller", "evaluate", "dream"))


def test_unknown_verb_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["frobnicate"])
    assert exit_.value.code == 2 and "invalid choice" in capsys.readouterr().err


def test_info(tiny_discrete: Tiny, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", str(tiny_discrete.bundle)]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line for line in out.splitlines() if line.strip()}
    assert tiny_discrete.env_id in lines["env"] and "max 20 steps" in lines["env"]
    assert "z 4, LSTM 16" in lines["model"] and "action dim 3" in lines["model"]
    assert "(20,)" in lines["observation"]
    assert "12 episodes" in lines["data"]
    held = [line for line in out.splitlines() if line.startswith("held-out")]
    assert len(held) == 2 and "reconstruction" in held[0] and "reward MSE" in held[1]
    assert "done precision" in out and "recall" in out
    assert main(["info", str(tiny_discrete.bundle), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == read_manifest(tiny_discrete.bundle)


def test_bad_bundle_one_line_error_exit_2(tmp_path: Path) -> None:
    """Through the real entry point, in a subprocess: exit status 2 and one line on stderr, no traceback."""
    run = subprocess.run([sys.executable, "-m", "dreamenv.cli", "info", str(tmp_path / "missing")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2, run.stderr
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dreamenv info: error:") and "missing" in lines[0]
    assert "Traceback" not in run.stderr and run.stdout == ""


@pytest.mark.parametrize("make_bad", ["empty dir", "tampered"])
def test_bad_bundles_in_process(make_bad: str, bundle_copy: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if make_bad == "empty dir":
        (path := tmp_path / "empty").mkdir()
        expected = "not a dreamenv bundle"
        argv = ["info", str(path)]
    else:
        path = bundle_copy
        (path / "vae.safetensors").write_bytes(b"not the weights")
        expected = "vae.safetensors"
        argv = ["dream", str(path), "--out", str(tmp_path / "x.gif"), "--steps", "2"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0] and err[0].startswith(f"dreamenv {argv[0]}: error:")


def test_collect_vector_env_needs_from_render(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["collect", f"{MODULE}:{VECTOR_ID}", "--out", str(tmp_path / "r.h5"), "--episodes", "2", "--backend", "serial"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--from-render" in err[0]
    assert main([*argv, "--from-render"]) == 0  # and with the flag it records
    assert "rollouts:" in capsys.readouterr().out and (tmp_path / "r.h5").is_file()
    for crop, expected in [("0,12", "four pixel bounds"), ("top", "--crop must be env, none or TOP,BOTTOM,LEFT,RIGHT")]:
        assert main([*argv, "--from-render", "--crop", crop]) == 2
        assert expected in capsys.readouterr().err


def test_dream_writes_a_gif(tiny_box: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    gif = tmp_path / "x.gif"
    assert main(["dream", str(tiny_box.bundle), "--out", str(gif), "--steps", "5", "--scale", "2"]) == 0
    assert f"wrote {gif}" in capsys.readouterr().out
    with Image.open(gif) as image:
        assert image.format == "GIF" and image.size == (128, 128)
        assert 2 <= image.n_frames <= 6  # the first frame plus at most 5 steps
    gif2 = tmp_path / "c.gif"
    argv = ["dream", str(tiny_box.bundle), "--out", str(gif2), "--steps", "3", "--controller", str(tiny_box.controller)]
    assert main(argv) == 0 and gif2.is_file()


def test_train_resumes_from_work_dir(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    work = shutil.copytree(tiny_discrete.work, tmp_path / "work")
    argv = ["train", str(tiny_discrete.rollouts), "--out", str(tmp_path / "bundle"), "--work-dir", str(work),
            "--z-dim", "4", "--vae-epochs", "1", "--vae-batch-size", "32", "--hidden-size", "16", "--mdn-epochs", "2",
            "--seq-len", "16"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"bundle: {tmp_path / 'bundle'}" in out
    assert read_manifest(tmp_path / "bundle")["files"] == read_manifest(tiny_discrete.bundle)["files"]


def test_controller_and_evaluate(tiny_discrete: Tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bundle, out = str(tiny_discrete.bundle), tmp_path / "ctrl"
    argv = ["controller", bundle, "--out", str(out), "--population", "4", "--rollouts", "1", "--generations", "1",
            "--max-steps", "10"]
    assert main(argv) == 0
    assert f"controller: {out}" in capsys.readouterr().out
    result_file = tmp_path / "result.json"
    argv = ["evaluate", bundle, "--controller", str(out), "--episodes", "2", "--temperatures", "0.5,1.2",
            "--backend", "serial", "--json", str(result_file)]
    assert main(argv) == 0
    table = capsys.readouterr().out
    assert "| 0.5 |" in table and "| 1.2 |" in table and "n/a" not in table
    result = json.loads(result_file.read_text())
    assert set(result["virtual"]) == {"0.5", "1.2"} and result["actual"]["episodes"] == 2
    # A controller path that does not exist is a one-line error.
    assert main(["evaluate", bundle, "--controller", str(tmp_path / "nope"), "--no-real"]) == 2
    assert "nope" in capsys.readouterr().err


def test_evaluate_several_controllers_gives_the_temperature_table(tiny_discrete: Tiny, tmp_path: Path,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    bundle = str(tiny_discrete.bundle)
    for tau in ("0.5", "1.3"):
        argv = ["controller", bundle, "--out", str(tmp_path / tau), "--temperature", tau, "--population", "4",
                "--rollouts", "1", "--generations", "1", "--max-steps", "10"]
        assert main(argv) == 0
    capsys.readouterr()
    argv = ["evaluate", bundle, "--controller", str(tmp_path / "1.3"), str(tmp_path / "0.5"), "--episodes", "2",
            "--backend", "serial", "--json", str(tmp_path / "t.json"), "--plot", str(tmp_path / "t.png")]
    assert main(argv) == 0
    result = json.loads((tmp_path / "t.json").read_text())
    assert [(r["temperature"], Path(r["controller"]).name) for r in result["rows"]] == [(0.5, "0.5"), (1.3, "1.3")]
    assert all(r["actual"]["episodes"] == 2 for r in result["rows"])
    assert (tmp_path / "t.png").stat().st_size > 1000
    # The same temperature twice, or --temperatures with several controllers, is refused.
    assert main(["evaluate", bundle, "--controller", str(tmp_path / "0.5"), str(tmp_path / "0.5"), "--no-real"]) == 2
    assert "same temperature" in capsys.readouterr().err
    assert main(["evaluate", bundle, "--controller", str(tmp_path / "0.5"), str(tmp_path / "1.3"), "--temperatures", "1"]) == 2
    assert "drop --temperatures" in capsys.readouterr().err


def test_recipe_extends_another(tmp_path: Path) -> None:
    """`extends` starts from another recipe (relative to this one): tables merge key by key, lists and values replace."""
    from dreamenv.cli import load_recipe

    (tmp_path / "base.toml").write_text('[run]\ndir = "runs/a"\n[controller]\npopulation = 64\nrollouts = 8\n'
                                        '[iterate]\nextra_data = ["x.h5", "y.h5"]\nepisodes = 200\n')
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "more.toml").write_text('extends = "../base.toml"\n[controller]\nrollouts = 16\n'
                                                '[iterate]\nextra_data = ["z.h5"]\n[evaluate]\nepisodes = 5\n')
    assert load_recipe(tmp_path / "sub" / "more.toml") == {
        "run": {"dir": "runs/a"}, "controller": {"population": 64, "rollouts": 16},
        "iterate": {"extra_data": ["z.h5"], "episodes": 200}, "evaluate": {"episodes": 5}}


@pytest.mark.parametrize("text, message", [('extends = "missing.toml"\n', "there is no"),
                                           ('extends = "loop.toml"\n', "extends itself"),
                                           ("extends = 3\n", "the path of one recipe")])
def test_recipe_extends_errors(tmp_path: Path, text: str, message: str) -> None:
    from dreamenv.cli import load_recipe

    (tmp_path / "loop.toml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(tmp_path / "loop.toml")


@pytest.mark.parametrize("recipe_path", sorted((Path(__file__).parent.parent / "configs").glob("*.toml")), ids=lambda p: p.name)
def test_project_recipes_build_their_configs(recipe_path: Path) -> None:
    """Every recipe in configs/ loads (with what it extends) and its [train] and agent tables are valid configs: a
    misspelt key in a recipe fails here, not an hour into a run."""
    from dreamenv.agents.actor_critic import ActorCriticConfig
    from dreamenv.agents.dagger import DAggerConfig
    from dreamenv.cli import load_recipe, recipe_world_model
    from dreamenv.train import TrainConfig
    from dreamenv.train_rssm import RSSMTrainConfig

    recipe = load_recipe(recipe_path)
    model, table = recipe_world_model(recipe)
    (RSSMTrainConfig if model == "rssm" else TrainConfig).from_dict(table)
    if "dagger" in recipe:
        DAggerConfig.from_dict({"teacher": "VizdoomTakeCover", **recipe["dagger"]})
    if "actor_critic" in recipe:
        ActorCriticConfig.from_dict(recipe["actor_critic"])
