"""The `dreamenv` command: collect | branch | mirror | train | info | controller | train-agent | evaluate | compare | dream | fidelity | pipeline | iterate."""
from __future__ import annotations

import argparse
import json
import sys
import tomllib
from pathlib import Path
from typing import Any

from gymnasium import error as gym_error


def _floats(text: str) -> list[float]:
    return [float(t) for t in text.split(",") if t.strip()]


def cmd_collect(args: argparse.Namespace) -> None:
    from dreamenv.data.collect import collect

    path = collect(args.env_id, args.out, episodes=args.episodes, workers=args.workers, policy=args.policy,
                   from_render=args.from_render, seed=args.seed, episodes_per_shard=args.episodes_per_shard,
                   backend=args.backend, compression=args.compression, controller=args.controller,
                   bundle=args.bundle, algo=args.algo, epsilon=args.epsilon, crop=parse_crop(args.crop))
    print(f"rollouts: {path}")


def cmd_branch(args: argparse.Namespace) -> None:
    from dreamenv.data.branch import BranchConfig, collect_branches

    config = BranchConfig(offsets=tuple(parse_ints(args.offsets, "--offsets")), context=args.context,
                          suffix=args.suffix, first_hold=tuple(parse_ints(args.first_hold, "--first-hold")))
    path = collect_branches(args.stores, args.out, config, workers=args.workers, seed=args.seed,
                            episodes_per_shard=args.episodes_per_shard, backend=args.backend,
                            compression=args.compression)
    print(f"branches: {path}")


def cmd_mirror(args: argparse.Namespace) -> None:
    from dreamenv.data.mirror import mirror_store

    try:
        action_map = _floats(args.action_map)
    except ValueError:
        raise ValueError(f"--action-map must be comma-separated numbers, got {args.action_map!r}") from None
    path = mirror_store(args.store, args.out, action_map, episodes_per_shard=args.episodes_per_shard,
                        compression=args.compression)
    print(f"mirrored: {path}")


def parse_ints(text: str, flag: str) -> list[int]:
    """A comma-separated list of integers, or a clear error naming the flag."""
    try:
        return [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None


def parse_crop(text: str) -> str | tuple[int, ...]:
    """--crop: "env", "none" or TOP,BOTTOM,LEFT,RIGHT."""
    if text in ("env", "none"):
        return text
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--crop must be env, none or TOP,BOTTOM,LEFT,RIGHT (four integers), got {text!r}") from None


def load_recipe(path: str | Path | None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A TOML recipe (configs/*.toml) as a dict; empty when no path is given.

    A top-level `extends = "other.toml"` (relative to the recipe) starts from that recipe: this one's tables are
    merged over it key by key, so a variation (another [iterate] chain, a [controller] setting) states only what differs.
    """
    if not path:
        return {}
    path = Path(path).resolve()
    if path in _seen:
        raise ValueError(f"recipe {path} extends itself (through {' -> '.join(str(p) for p in _seen)}): break the cycle")
    with open(path, "rb") as handle:
        recipe = tomllib.load(handle)
    base = recipe.pop("extends", None)
    if base is None:
        return recipe
    if not isinstance(base, str):
        raise ValueError(f"{path}: extends must be the path of one recipe, got {base!r}")
    base_path = path.parent / base
    if not base_path.is_file():
        raise ValueError(f"{path}: extends {base!r}, but there is no {base_path}: give the path relative to the recipe")
    return _merge_tables(load_recipe(base_path, (*_seen, path)), recipe)


def _merge_tables(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """base with over's values on top; tables present in both are merged recursively, anything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        merged[key] = _merge_tables(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _merge_overrides(recipe: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """Command-line values (None: not given) over a recipe's, one level of tables deep."""
    for key, value in overrides.items():
        if isinstance(value, dict):
            recipe.setdefault(key, {}).update({k: v for k, v in value.items() if v is not None})
        elif value is not None:
            recipe[key] = value
    return recipe


WORLD_MODELS = ("mdnrnn", "rssm")


def recipe_world_model(recipe: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """A recipe's `[train] model` ("mdnrnn", the default: V + M; or "rssm") and the rest of its [train] table,
    which configures that model; any other model name is an error naming the allowed ones."""
    table = dict(recipe.get("train", {}))
    model = table.pop("model", "mdnrnn")
    if model not in WORLD_MODELS:
        raise ValueError(f"[train] model = {model!r}: the allowed values are {', '.join(map(repr, WORLD_MODELS))}")
    return model, table


def recipe_rollouts(run: dict[str, Any]) -> Path:
    """The rollout store of a recipe's [run] table: `rollouts` if given (another run's store, reused when [collect]
    matches the run that wrote it), else DIR/rollouts.h5."""
    return Path(run.get("rollouts", Path(run.get("dir", "")) / "rollouts.h5"))


def train_rssm_command(args: argparse.Namespace, recipe: dict[str, Any]) -> None:
    """`dreamenv train --model rssm`: the RSSM on the rollouts (through a trained V with --vae-from); other V and M
    options are refused, not ignored."""
    from dreamenv.train_rssm import RSSMTrainConfig, train_rssm_world_model

    v_and_m = {"--z-dim": args.z_dim, "--vae-epochs": args.vae_epochs, "--vae-batch-size": args.vae_batch_size,
               "--mdn-epochs": args.mdn_epochs, "--mdnrnn-from": args.mdnrnn_from, "--vae-init-from": args.vae_init_from}
    given = [flag for flag, value in v_and_m.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set V or M, which an RSSM does not train: drop them (--vae-from BUNDLE "
                         "lets the RSSM see through that bundle's trained V), or train with --model mdnrnn")
    overrides = {"rssm": {"deter": args.hidden_size, "stoch": args.stoch, "classes": args.classes,
                          "epochs": args.rssm_epochs, "seq_len": args.seq_len},
                 "seed": args.seed, "default_temperature": args.temperature}
    model = train_rssm_world_model(args.data, args.out, RSSMTrainConfig.from_dict(_merge_overrides(recipe, overrides)),
                                   work_dir=args.work_dir, vae_from=args.vae_from)
    print(f"bundle: {args.out}")
    print(json.dumps(model.info["heldout"], indent=2))


def cmd_train(args: argparse.Namespace) -> None:
    from dreamenv.train import TrainConfig, train_world_model

    recipe_model, recipe = recipe_world_model(load_recipe(args.config))
    if (args.model or recipe_model) == "rssm":
        train_rssm_command(args, recipe)
        return
    rssm_only = {"--stoch": args.stoch, "--classes": args.classes, "--rssm-epochs": args.rssm_epochs}
    given = [flag for flag, value in rssm_only.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} set the RSSM: add --model rssm")
    overrides = {"vae": {"z_dim": args.z_dim, "epochs": args.vae_epochs, "batch_size": args.vae_batch_size},
                 "mdnrnn": {"hidden_size": args.hidden_size, "epochs": args.mdn_epochs, "seq_len": args.seq_len},
                 "seed": args.seed, "default_temperature": args.temperature}
    model = train_world_model(args.data, args.out, TrainConfig.from_dict(_merge_overrides(recipe, overrides)), work_dir=args.work_dir,
                              vae_from=args.vae_from, mdnrnn_from=args.mdnrnn_from, vae_init_from=args.vae_init_from)
    print(f"bundle: {args.out}")
    print(json.dumps(model.info["heldout"], indent=2))


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def cmd_info(args: argparse.Namespace) -> None:
    from dreamenv.registry import resolve_bundle
    from dreamenv.worldmodel import read_manifest

    path = resolve_bundle(args.bundle)
    manifest = read_manifest(path)
    if args.json:
        print(json.dumps(manifest, indent=2))
        return
    dims, info = manifest["dims"], manifest.get("info", {})
    print(f"bundle      {path}")
    print(f"env         {manifest['env_id']}   (max {manifest['max_episode_steps']} steps)")
    if manifest["model_kind"] == "rssm":
        vae_z = manifest["rssm"].get("vae_z_dim", 0)
        seen = f"through V z {vae_z} of {info.get('vae_from', {}).get('bundle', 'another bundle')}" if vae_z else "own CNN"
        print(f"model       rssm: GRU {dims['hidden_size']}, {dims['stoch']} x {dims['classes']} categorical latents, "
              f"action dim {dims['action_dim']}, frames seen {seen}")
    else:
        print(f"model       {manifest['model_kind']}: z {dims['z_dim']}, LSTM {dims['hidden_size']}, {dims['num_gaussians']} Gaussians, action dim {dims['action_dim']}")
    print(f"observation latent: Box(({dims['z_dim'] + dims['hidden_size']},), float32)  pixels: Box(0, 255, (64, 64, 3), uint8)")
    print(f"action      {manifest['action_space']}")
    print(f"temperature {manifest['default_temperature']}   initial states {dims['initial_states']}")
    print(f"versions    {manifest['versions']}")
    data = info.get("data", {})
    if data:
        print(f"data        {data.get('episodes')} episodes, {data.get('steps')} steps ({data.get('train_episodes')} train / "
              f"{data.get('heldout_episodes')} held out), mean return {data.get('episode_return_mean', float('nan')):.1f}, "
              f"mean length {data.get('episode_length_mean', float('nan')):.1f}")
    held = info.get("heldout", {})
    if held.get("vae"):
        v = held["vae"]
        print(f"held-out V  reconstruction {v['reconstruction']:.2f} (sum sq. error per frame), KL {v['kl']:.2f}")
    if held.get("mdnrnn"):
        m = held["mdnrnn"]
        print(f"held-out M  z NLL {m['z_nll']:.3f}, reward MSE {m['reward_mse']:.4f} (MAE {m['reward_mae']:.4f})")
    if held.get("rssm"):
        m = held["rssm"]
        unit = "of V's z" if manifest["rssm"].get("vae_z_dim", 0) else "per frame"
        print(f"held-out    RSSM reconstruction {m['reconstruction']:.2f} (sum sq. error {unit}), KL[q || p] {m['kl']:.3f}, "
              f"reward MSE {m['reward_mse']:.4f} (MAE {m['reward_mae']:.4f})")
    m = held.get("mdnrnn") or held.get("rssm")
    if m:
        if "return_correlation" in m:  # bundles of earlier versions lack it
            print(f"            episode returns (teacher-forced): correlation {_fmt(m['return_correlation'])}, "
                  f"mean abs. error {m['return_mae']:.2f}")
        print(_done_line(m))


def _done_line(m: dict[str, Any]) -> str:
    """The held-out done-head line of `dreamenv info`."""
    return (f"            done precision {_fmt(m['done_precision'])} recall {_fmt(m['done_recall'])} (threshold 0.5); "
            f"sampled: precision {_fmt(m['done_precision_sampled'])} recall {_fmt(m['done_recall_sampled'])} "
            f"over {int(m['terminal_steps'])} terminal steps; predicted ends per true end "
            f"{_fmt(m.get('predicted_dones_per_true'))}")


def cmd_controller(args: argparse.Namespace) -> None:
    from dreamenv.agents.controller import CMAESConfig, train_controller

    recipe = load_recipe(args.config).get("controller", {})
    overrides = {"population": args.population, "rollouts": args.rollouts, "generations": args.generations,
                 "temperature": args.temperature, "seed": args.seed, "max_steps": args.max_steps,
                 "temperature_range": args.temperature_range, "done_mode": args.done_mode, "done_threshold": args.done_threshold,
                 "obs_mode": args.obs_mode, "real_starts": (args.real_starts or bool(args.start_data)) or None,
                 "real_start_episodes": args.real_start_episodes, "start_data": args.start_data,
                 "init_from": args.init_from, "sigma0": args.sigma0}
    recipe.update({k: v for k, v in overrides.items() if v is not None})
    controller = train_controller(args.bundle, args.out, CMAESConfig(**recipe))
    last = controller.info["history"][-1] if controller.info["history"] else {}
    print(f"controller: {args.out}  (last generation mean dream return {last.get('mean', float('nan')):.1f})")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dreamenv.agents.controller import load_controller
    from dreamenv.evaluate import (
        evaluate, format_table, format_temperature_table, plot_temperature_table, temperature_table, trained_temperature,
    )
    from dreamenv.registry import load_world_model

    if len(args.controller) == 1:
        result = evaluate(args.bundle, args.controller[0], episodes=args.episodes, temperatures=args.temperatures,
                          seed=args.seed, backend=args.backend, workers=args.workers, real=not args.no_real)
        print(format_table(result))
    else:  # the paper's table: each controller in the dream it was trained in, and in the game
        if args.temperatures:
            raise ValueError("with several controllers each is scored at its own training temperature: drop --temperatures")
        wm = load_world_model(args.bundle)
        controllers = {trained_temperature(load_controller(c, wm).info, wm.default_temperature): c for c in args.controller}
        if len(controllers) != len(args.controller):
            raise ValueError("two controllers were trained at the same temperature: give one per temperature")
        result = temperature_table(args.bundle, controllers, episodes=args.episodes, seed=args.seed, backend=args.backend,
                                   workers=args.workers, real=not args.no_real)
        print(format_temperature_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_temperature_table(result, args.plot)}")


def cmd_compare(args: argparse.Namespace) -> None:
    from dreamenv.compare import compare

    result = compare(args.policy, args.bundle, args.temperatures, args.episodes, args.seed, args.backend, args.workers,
                     algo=args.algo, real=not args.no_real, done_mode=args.done_mode, done_threshold=args.done_threshold,
                     deterministic=not args.stochastic, encoding=args.encoding)
    table = result.markdown()
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.markdown:
        Path(args.markdown).write_text(table + "\n")
        print(f"wrote {args.markdown}")
    if args.plot:
        print(f"wrote {result.plot(args.plot)}")


def cmd_train_agent(args: argparse.Namespace) -> None:
    from dreamenv.agents.train import ALGO_TABLES, train_agent

    recipe = load_recipe(args.config)
    for option, value, algos in (("--start-data", args.start_data, ("actor-critic", "ppo", "sac", "dagger")),
                                 ("--real-episodes", args.real_episodes, ("dagger",)),
                                 ("--max-steps", args.max_steps, ("ppo", "sac")),
                                 ("--temperature-range", args.temperature_range, ("actor-critic",)),
                                 ("--actor-gradient", args.actor_gradient, ("actor-critic",)),
                                 ("--done-critics", args.done_critics, ("actor-critic",)),
                                 ("--obs-mode", args.obs_mode, ("actor-critic", "cmaes", "dagger"))):
        if value and args.algo not in algos:
            has_twin = option in ("--start-data", "--max-steps", "--temperature-range")  # `dreamenv controller` has these
            hint = f" (for CMA-ES: dreamenv controller {option})" if has_twin else ""
            raise ValueError(f"{option} is an option of {', '.join(algos)} here; {args.algo} does not use it{hint}")
    if (args.teacher or args.teacher_algo) and args.algo != "dagger":
        raise ValueError(f"--teacher and --teacher-algo are DAgger options; {args.algo} does not use them (--algo dagger)")
    overrides = {"temperature": args.temperature, "seed": args.seed, "done_mode": args.done_mode, "obs_mode": args.obs_mode}
    if args.algo == "dagger":
        if args.timesteps is not None:
            raise ValueError("--timesteps is a PPO, SAC and actor-critic option: DAgger takes its budget from the "
                             "--config recipe's [dagger] table (rounds, dreams)")
        overrides.update(dreams=args.n_envs, teacher=args.teacher, teacher_algo=args.teacher_algo,
                         real_episodes=args.real_episodes, start_data=args.start_data)
    elif args.algo == "cmaes":
        if args.timesteps is not None or args.n_envs is not None:
            raise ValueError("--timesteps and --n-envs are PPO, SAC and actor-critic options: CMA-ES takes its budget from "
                             "the --config recipe's [controller] table, or use `dreamenv controller` (--population, --rollouts, --generations)")
    elif args.algo == "actor-critic":
        overrides.update(batch=args.n_envs, start_data=args.start_data, temperature_range=args.temperature_range,
                         actor_gradient=args.actor_gradient, done_critics=args.done_critics)
    else:
        overrides.update(n_envs=args.n_envs, start_data=args.start_data, max_steps=args.max_steps)
    settings = {**recipe.get(ALGO_TABLES[args.algo], {}), **{k: v for k, v in overrides.items() if v is not None}}
    train_agent(args.algo, args.bundle, args.out, settings, args.timesteps)
    print(f"agent: {args.out}  (score it: dreamenv compare {args.bundle} --policy {args.out})")


def cmd_ensemble(args: argparse.Namespace) -> None:
    from dreamenv.agents.ensemble import save_ensemble

    out = save_ensemble(args.out, args.agents)
    print(f"ensemble of {len(args.agents)} actor-critics: {out}  (score it: dreamenv compare BUNDLE --policy {out})")


def cmd_dream(args: argparse.Namespace) -> None:
    from PIL import Image

    from dreamenv.agents.controller import load_controller
    from dreamenv.envs.dream import DreamEnv

    controller = load_controller(args.controller, args.bundle) if args.controller else None
    obs_mode = controller.obs_mode if controller else "latent"
    env = DreamEnv(args.bundle, temperature=args.temperature, obs_mode=obs_mode, render_mode="rgb_array")
    obs, _ = env.reset(seed=args.seed)
    frames, total = [env.render()], 0.0
    for _ in range(args.steps):
        action = controller.act(obs) if controller else env.action_space.sample()
        obs, reward, terminated, _, _ = env.step(action)
        total += reward
        frames.append(env.render())
        if terminated:
            break
    images = [Image.fromarray(f).resize((args.scale * 64, args.scale * 64), Image.NEAREST) for f in frames]
    images[0].save(args.out, save_all=True, append_images=images[1:], duration=1000 // 30, loop=0)
    print(f"wrote {args.out}: {len(frames)} frames, dream return {total:.1f}")


def cmd_fidelity(args: argparse.Namespace) -> None:
    from dreamenv.fidelity import FidelityConfig, fidelity, format_fidelity, plot_fidelity

    config = FidelityConfig(horizon=args.horizon, stride=args.stride, temperature=args.temperature,
                            max_episodes=args.episodes, all_episodes=args.all_episodes, seed=args.seed)
    result = fidelity([args.bundle_a, args.bundle_b], args.data, config)
    print(format_fidelity(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if args.plot:
        print(f"wrote {plot_fidelity(result, args.plot)}")


def cmd_pipeline(args: argparse.Namespace) -> None:
    from dreamenv.agents.controller import CMAESConfig, train_controller
    from dreamenv.data.collect import collect
    from dreamenv.evaluate import evaluate, format_table, format_temperature_table, plot_temperature_table, temperature_table
    from dreamenv.train import TrainConfig, train_world_model
    from dreamenv.train_rssm import RSSMTrainConfig, train_rssm_world_model

    recipe = load_recipe(args.config)
    run = recipe.get("run", {})
    if "env_id" not in run or "dir" not in run:
        raise ValueError(f"{args.config}: the recipe needs a [run] table with env_id and dir")
    model, table = recipe_world_model(recipe)  # checked before collecting: a typo fails now, not an hour later
    config = RSSMTrainConfig.from_dict(table) if model == "rssm" else TrainConfig.from_dict(table)
    root = Path(run["dir"])
    rollouts, bundle, controller = recipe_rollouts(run), root / "bundle", root / "controller"
    print(f"[1/4] collect -> {rollouts}")
    collect(run["env_id"], rollouts, **recipe.get("collect", {}))
    print(f"[2/4] train {'the RSSM' if model == 'rssm' else 'V + M'} -> {bundle}")
    if (bundle / "manifest.json").is_file():
        print("      bundle exists: skipped (delete it to retrain)")
    elif model == "rssm":
        train_rssm_world_model(rollouts, bundle, config)
    else:
        train_world_model(rollouts, bundle, config)
    settings = dict(recipe.get("controller", {}))
    temperatures = settings.pop("temperatures", None)
    if temperatures is None:
        print(f"[3/4] controller (CMA-ES in the dream) -> {controller}")
        train_controller(bundle, controller, CMAESConfig(**settings))
        print("[4/4] evaluate: virtual vs actual")
        result = evaluate(bundle, controller, **recipe.get("evaluate", {}))
        print(format_table(result))
    else:
        controllers = {float(tau): root / "controllers" / f"tau-{tau:g}" for tau in temperatures}
        for tau, path in controllers.items():
            print(f"[3/4] controller (CMA-ES in the dream at tau {tau:g}) -> {path}")
            train_controller(bundle, path, CMAESConfig(**{**settings, "temperature": tau}))
        print("[4/4] evaluate: each controller in its dream and in the real game")
        options = {k: v for k, v in recipe.get("evaluate", {}).items() if k != "temperatures"}
        result = temperature_table(bundle, controllers, **options)
        print(format_temperature_table(result))
    (root / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {root / 'results.json'}")
    if temperatures is not None:
        try:
            print(f"wrote {plot_temperature_table(result, root / 'temperature.png')}")
        except gym_error.DependencyNotInstalled as error:
            print(f"no plot: {error}")


def cmd_iterate(args: argparse.Namespace) -> None:
    from dreamenv.agents.controller import CMAESConfig, train_controller
    from dreamenv.agents.saved import AGENT_FILE, read_agent_info
    from dreamenv.agents.train import ALGO_TABLES, train_agent
    from dreamenv.compare import compare
    from dreamenv.data.collect import collect
    from dreamenv.evaluate import evaluate, format_table, trained_temperature
    from dreamenv.registry import load_world_model
    from dreamenv.train import TrainConfig, train_world_model
    from dreamenv.train_rssm import RSSMTrainConfig, train_rssm_world_model

    recipe = load_recipe(args.config)
    run = recipe.get("run", {})
    root = Path(run.get("dir", ""))
    settings = recipe.get("iterate", {})
    model, table = recipe_world_model(recipe)
    fine_tuning = [key for key in ("warm_start", "mdn_epochs") if key in settings]
    if model == "rssm" and fine_tuning:
        raise ValueError(f"[iterate] {', '.join(fine_tuning)}: fine-tuning is MDN-RNN only for now; with an RSSM recipe "
                         "each round retrains the RSSM from scratch on all the data (drop these settings)")
    if "agent" in settings and "controller" in settings:
        raise ValueError("[iterate] names a controller and an agent: keep the one whose rounds to run")
    bundle = Path(settings.get("bundle", root / "bundle"))
    policy = Path(settings["agent"] if "agent" in settings else settings.get("controller", root / "controller"))
    marker = AGENT_FILE if "agent" in settings else "controller.json"
    if not (bundle / "manifest.json").is_file() or not (policy / marker).is_file():
        first = f"dreamenv train-agent {bundle} --out {policy}" if "agent" in settings else f"dreamenv pipeline {args.config}"
        raise ValueError(f"no bundle {bundle} or {'agent' if 'agent' in settings else 'controller'} {policy} yet: run `{first}` first")
    algo = read_agent_info(policy)["algo"] if "agent" in settings else "linear"
    if algo not in ("linear", *ALGO_TABLES):
        raise ValueError(f"{policy} holds a {algo} agent; iterate retrains a controller, actor-critic, ppo or sac agent")
    stores = [recipe_rollouts(run), *(Path(extra) for extra in settings.get("extra_data", []))]
    controller_settings = {k: v for k, v in recipe.get("controller", {}).items() if k != "temperatures"}
    for number in range(1, args.rounds + 1):
        step = root / f"{settings.get('name', 'round')}{number}"
        print(f"round {number}: collect {settings.get('episodes', 200)} episodes with {policy}")
        stores.append(collect(run["env_id"], step / "rollouts.h5", episodes=int(settings.get("episodes", 200)),
                              workers=int(settings.get("workers", 2)), backend=settings.get("backend", "process"), policy="controller",
                              controller=str(policy), bundle=str(bundle), algo=algo, epsilon=float(settings.get("epsilon", 0.0)),
                              seed=int(settings.get("seed", 0)) + 10**6 * number))
        if (step / "bundle" / "manifest.json").is_file():
            print(f"round {number}: bundle exists: not retrained")
        elif model == "rssm":
            print(f"round {number}: retrain the RSSM from scratch on {len(stores)} stores")
            train_rssm_world_model(stores, step / "bundle", RSSMTrainConfig.from_dict(table))
        else:
            print(f"round {number}: retrain M on {len(stores)} stores, V from {root / 'bundle'}")
            config = TrainConfig.from_dict(table)
            if "mdn_epochs" in settings:  # e.g. fewer epochs when fine-tuning the previous round's M (warm_start)
                config.mdnrnn.epochs = int(settings["mdn_epochs"])
            train_world_model(stores, step / "bundle", config, vae_from=root / "bundle",
                              mdnrnn_from=bundle if settings.get("warm_start", False) else None)
        bundle = step / "bundle"
        if algo == "linear":
            start = {"init_from": str(policy)} if settings.get("controller_warm_start", False) else {}
            policy = step / "controller"
            print(f"round {number}: CMA-ES in the new dream" + (f", from {start['init_from']}" if start else ""))
            train_controller(bundle, policy, CMAESConfig(**{**controller_settings, **start}))
        else:
            policy = step / "agent"
            print(f"round {number}: {algo} in the new dream")
            train_agent(algo, bundle, policy, recipe.get(ALGO_TABLES[algo], {}))
        if not (step / "results.json").is_file():
            if algo == "linear":
                result = evaluate(bundle, policy, **recipe.get("evaluate", {}))
            else:  # at the temperature the agent trained at, unless [evaluate] says
                tau = trained_temperature(read_agent_info(policy), load_world_model(bundle).default_temperature)
                result = compare(policy, bundle, **{"temperatures": [tau], **recipe.get("evaluate", {})})
            print(format_table(result))
            (step / "results.json").write_text(json.dumps(result, indent=2) + "\n")


def build_parser() -> argparse.ArgumentParser:
    from dreamenv.compare import POLICY_ALGOS

    parser = argparse.ArgumentParser(prog="dreamenv", description="Learned world models as Gymnasium envs: collect rollouts, "
                                     "train V + M, train a controller in the dream, score it in reality.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("collect", help="record rollouts of a Gymnasium env into HDF5 (resumable, parallel)")
    p.add_argument("env_id", help="Gymnasium id, e.g. VizdoomTakeCover-v1 or CarRacing-v3")
    p.add_argument("--out", required=True, help="index file to write, e.g. runs/doom/rollouts.h5 (shards go beside it)")
    p.add_argument("--episodes", type=int, default=100, help="total episodes (rerun with more to extend; default 100)")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    p.add_argument("--policy", default="random", choices=["random", "brownian", "hold", "drive", "road", "controller"],
                   help="random actions, held/brownian random actions, hold (random actions held for a mean of 1..200 "
                   "steps drawn per episode), drive (CarRacing: steer randomly, mostly gas), road "
                   "(CarRacing: follow the road with random gain, noise and gas), or --controller")
    p.add_argument("--controller", help="controller directory or shipped name, with --policy controller (with --algo: "
                   "an agent's `dreamenv train-agent` directory or shipped name)")
    p.add_argument("--algo", default="linear", choices=POLICY_ALGOS,
                   help="what --controller holds: linear (a controller, the default) or the agent's algo")
    p.add_argument("--bundle", help="the controller's bundle (its V and M turn frames into observations)")
    p.add_argument("--epsilon", type=float, default=0.0,
                   help="with --policy controller: take a random action with this probability at each step (default 0)")
    p.add_argument("--from-render", action="store_true", help="record render() frames, for envs with vector observations")
    p.add_argument("--crop", default="env", help="env (the env's rule: CarRacing drops its dashboard), none (the whole "
                   "frame) or TOP,BOTTOM,LEFT,RIGHT pixel bounds (default env)")
    p.add_argument("--seed", type=int, default=0, help="episode i is reset with seed+i (default 0)")
    p.add_argument("--episodes-per-shard", type=int, default=8, help="episodes per shard file (default 8)")
    p.add_argument("--backend", default="process", choices=["serial", "process", "ray"], help="evaluator backend")
    p.add_argument("--compression", default="gzip", choices=["gzip", "zstd", "none"], help="frame compression (default gzip)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("branch", help="replay the deaths of recorded episodes and branch off before each (resumable)")
    p.add_argument("stores", nargs="+", help="rollout index file(s) written by `dreamenv collect`, all of one env")
    p.add_argument("--out", required=True, help="index file to write (shards go beside it)")
    p.add_argument("--offsets", default="8,15,25,40,60,90", help="branch this many steps before each death "
                   "(default 8,15,25,40,60,90)")
    p.add_argument("--context", type=int, default=150, help="recorded steps kept before each branch point (default 150)")
    p.add_argument("--suffix", type=int, default=300, help="steps at most after the branch point (default 300)")
    p.add_argument("--first-hold", default="5,30", help="the first other action is held LOW,HIGH steps (default 5,30)")
    p.add_argument("--workers", type=int, default=2, help="parallel worker processes (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seeds the other actions (default 0)")
    p.add_argument("--episodes-per-shard", type=int, default=10, help="deaths per shard file (default 10)")
    p.add_argument("--backend", default="process", choices=["serial", "process", "ray"], help="evaluator backend")
    p.add_argument("--compression", default="gzip", choices=["gzip", "zstd", "none"], help="frame compression (default gzip)")
    p.set_defaults(func=cmd_branch)

    p = sub.add_parser("mirror", help="write a store's episodes mirrored left to right, for symmetric games (resumable)")
    p.add_argument("store", help="rollout index file written by `dreamenv collect` (or `branch`)")
    p.add_argument("--out", required=True, help="index file to write (shards go beside it)")
    p.add_argument("--action-map", required=True, help="Discrete: the mirror image of each action in order "
                   "(VizdoomTakeCover's none, right, left: 0,2,1); Box: a sign per dimension (CarRacing: -1,1,1)")
    p.add_argument("--episodes-per-shard", type=int, default=8, help="episodes per shard file (default 8)")
    p.add_argument("--compression", default="gzip", choices=["gzip", "zstd", "none"], help="frame compression (default gzip)")
    p.set_defaults(func=cmd_mirror)

    p = sub.add_parser("train", help="train V then M (or an RSSM) on rollouts and write a bundle (resumable)")
    p.add_argument("data", nargs="+", help="rollout index file(s) written by `dreamenv collect`, all of one env")
    p.add_argument("--out", required=True, help="bundle directory to write")
    p.add_argument("--model", choices=WORLD_MODELS,
                   help="mdnrnn: V + M (World Models); rssm: DreamerV3's RSSM (docs/rssm.md). Default: the recipe's "
                   "[train] model, else mdnrnn")
    p.add_argument("--config", help="TOML recipe with [train], [train.vae], [train.mdnrnn] (or [train.rssm]) tables")
    p.add_argument("--work-dir", help="resume checkpoints (default: OUT.work)")
    p.add_argument("--vae-from", help="reuse this bundle's V instead of training one (retrain M only; with --model "
                   "rssm, the RSSM sees the frames through this V)")
    p.add_argument("--mdnrnn-from", help="start M from this bundle's M (fine-tune; needs --vae-from, usually the same bundle)")
    p.add_argument("--vae-init-from", help="start V from this bundle's V and train it --vae-epochs more epochs on DATA")
    p.add_argument("--z-dim", type=int, help="V latent size (paper: 32 CarRacing, 64 Doom)")
    p.add_argument("--vae-epochs", type=int, help="epochs of V")
    p.add_argument("--vae-batch-size", type=int, help="V batch size")
    p.add_argument("--hidden-size", type=int, help="M's LSTM size (paper: 256 CarRacing, 512 Doom), or the RSSM's GRU size")
    p.add_argument("--mdn-epochs", type=int, help="epochs of M")
    p.add_argument("--rssm-epochs", type=int, help="epochs of the RSSM")
    p.add_argument("--stoch", type=int, help="RSSM: number of categorical latents (default 32)")
    p.add_argument("--classes", type=int, help="RSSM: classes per latent (default 32)")
    p.add_argument("--seq-len", type=int, help="M's (or the RSSM's) training sequence length")
    p.add_argument("--temperature", type=float, help="default dream temperature stored in the bundle")
    p.add_argument("--seed", type=int, help="training seed")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("info", help="describe a bundle: dims, spaces, data, held-out losses")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--json", action="store_true", help="print the whole manifest as JSON")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("controller", help="train the linear controller with CMA-ES inside the dream (resumable)")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--out", required=True, help="controller directory to write")
    p.add_argument("--config", help="TOML recipe with a [controller] table")
    p.add_argument("--temperature", type=float, help="dream temperature (default: the bundle's)")
    p.add_argument("--population", type=int, help="CMA-ES population (paper: 64)")
    p.add_argument("--rollouts", type=int, help="dream rollouts per candidate (paper: 16)")
    p.add_argument("--generations", type=int, help="CMA-ES generations (default 100)")
    p.add_argument("--temperature-range", type=_floats, metavar="LOW,HIGH",
                   help="draw each dream's temperature uniformly from LOW..HIGH (overrides --temperature)")
    p.add_argument("--done-mode", choices=["sample", "threshold", "expected"],
                   help="how M's p(done) ends a dream (default sample); expected: no draw, each reward weighted by the "
                        "chance of being alive")
    p.add_argument("--done-threshold", type=float, help="with --done-mode threshold: end when p(done) exceeds this (default 0.5)")
    p.add_argument("--max-steps", type=int, help="cap on dream episode length (default: the env's limit)")
    p.add_argument("--obs-mode", choices=["latent", "latent_cell"],
                   help="the controller's input: latent = [z, h] (default), latent_cell = [z, c, h] with M's LSTM cell state")
    p.add_argument("--real-starts", action="store_true",
                   help="start each dream from a state of a real episode in the bundle's data (with --max-steps: short "
                   "branches, as Dreamer imagines from replayed states)")
    p.add_argument("--real-start-episodes", type=int, help="real episodes followed for --real-starts (default 64)")
    p.add_argument("--start-data", nargs="+", metavar="DATA",
                   help="rollout store(s) to draw the real starts from (implies --real-starts; default: the bundle's own data)")
    p.add_argument("--init-from", metavar="CONTROLLER",
                   help="start CMA-ES from this controller's weights (directory or shipped name; may be of another bundle "
                   "of the env, e.g. the last round's C in the iterative procedure)")
    p.add_argument("--sigma0", type=float, help="CMA-ES initial step size (default 0.1)")
    p.add_argument("--seed", type=int, help="CMA-ES seed")
    p.set_defaults(func=cmd_controller)

    p = sub.add_parser("evaluate", help="virtual (dream) vs actual (real game) score of a controller, or the paper's "
                       "temperature table of several")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--controller", required=True, nargs="+",
                   help="controller directory or shipped name; several (one per training temperature) give the paper's table")
    p.add_argument("--episodes", type=int, default=100, help="episodes in each (default 100)")
    p.add_argument("--temperatures", type=_floats, help="comma-separated dream temperatures (default: the controller's)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed")
    p.add_argument("--backend", default="process", choices=["serial", "process", "ray"], help="real-env backend")
    p.add_argument("--workers", type=int, default=2, help="real-env workers (default 2)")
    p.add_argument("--no-real", action="store_true", help="score in the dream only")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="also write a PNG of virtual and actual score against tau (needs dreamenv[plot])")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="score any agent in the dream and in the real game: paired seeds, bootstrap 95%% CIs")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--policy", required=True,
                   help="controller directory or shipped name, `dreamenv train-agent` directory (or shipped name with --algo "
                   "actor-critic), or an SB3 .zip (with --algo)")
    p.add_argument("--algo", choices=POLICY_ALGOS, help="what saved the policy; needed for a bare SB3 .zip")
    p.add_argument("--temperatures", type=_floats, help="comma-separated dream temperatures (default: the bundle's)")
    p.add_argument("--episodes", type=int, default=100, help="episodes in each; episode i uses seed SEED+i in both (default 100)")
    p.add_argument("--seed", type=int, default=0, help="first episode seed (default 0)")
    p.add_argument("--backend", default="process", choices=["serial", "process", "ray"], help="real-env backend")
    p.add_argument("--workers", type=int, default=2, help="real-env workers (default 2)")
    p.add_argument("--no-real", action="store_true", help="score in the dream only")
    p.add_argument("--stochastic", action="store_true",
                   help="sample the policy's actions (predict(obs, deterministic=False)), seeded per episode")
    p.add_argument("--encoding", default="mean", choices=["mean", "sample"],
                   help="how the real game's frames become z: V's mean (default) or a draw from V's posterior, seeded "
                   "per episode, as M saw its inputs in training (V + M bundles)")
    p.add_argument("--done-mode", default="sample", choices=["sample", "threshold"], help="how M's p(done) ends a dream (default sample)")
    p.add_argument("--done-threshold", type=float, default=0.5, help="with --done-mode threshold: end when p(done) exceeds this")
    p.add_argument("--json", help="also write the results (with per-episode scores) to this JSON file")
    p.add_argument("--markdown", help="also write the table to this Markdown file")
    p.add_argument("--plot", help="also write a PNG of the scores against tau (needs dreamenv[plot])")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("train-agent", help="train an agent in the dream: ppo or sac (Stable-Baselines3), actor-critic "
                       "(Dreamer-style), cmaes (the paper's controller) or dagger (the paper's controller imitating a teacher)")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--algo", required=True, choices=["ppo", "sac", "actor-critic", "cmaes", "dagger"],
                   help="ppo: SB3 PPO on batched dreams; sac: SB3 SAC on batched dreams (Box actions only); "
                   "actor-critic: learned in imagination (Discrete or Box actions); cmaes: `dreamenv controller`; "
                   "dagger: a linear controller fitted to --teacher's actions on the dream states it reaches")
    p.add_argument("--out", required=True, help="directory to write (agent.json beside the weights, or a controller); "
                   "rerun to resume")
    p.add_argument("--config", help="TOML recipe: its [ppo], [sac], [actor_critic], [controller] (cmaes) or [dagger] table")
    p.add_argument("--timesteps", type=int, help="ppo, sac, actor-critic: dream steps to train on (ppo, sac default 1,000,000)")
    p.add_argument("--temperature", type=float, help="dream temperature (default: the bundle's)")
    p.add_argument("--n-envs", type=int, help="ppo, sac, actor-critic, dagger: dreams stepped as one batch "
                   "(default 16 / 4 / 256 / 128)")
    p.add_argument("--temperature-range", type=_floats, metavar="LOW,HIGH",
                   help="actor-critic: draw each dream's temperature uniformly from LOW..HIGH (overrides --temperature)")
    p.add_argument("--start-data", nargs="+", metavar="DATA",
                   help="actor-critic: rollout store(s) its imagination starts from (default: the bundle's own data, "
                   "which a shipped bundle does not include); ppo, sac: start every dream from a state of these real "
                   "episodes instead of a first frame; dagger: the real episodes of --real-episodes")
    p.add_argument("--real-episodes", type=int, metavar="N",
                   help="dagger: the teacher also labels every state of N recorded real episodes (of --start-data, "
                   "default the bundle's rollouts) and the controller fits them too")
    p.add_argument("--max-steps", type=int, help="ppo, sac: truncate each dream after this many steps (default: the "
                   "env's limit); with --start-data, short branches from real states")
    p.add_argument("--done-mode", choices=["sample", "threshold", "expected"],
                   help="how M's p(done) ends a dream (default sample); expected: no death is drawn, each reward is "
                        "weighted by the chance of being alive")
    p.add_argument("--actor-gradient", choices=["reinforce", "dynamics"],
                   help="actor-critic: reinforce (default) or dynamics: Box actions learn from the returns' gradient "
                   "through the world model's steps (M's or the RSSM's), as Dreamer for continuous control (with "
                   "--done-mode expected)")
    p.add_argument("--done-critics", nargs="+", metavar="BUNDLE",
                   help="actor-critic, with --done-mode expected: other Ms through the bundle's V follow each imagined "
                   "dream, and each step continues with 1 - the largest p(done) of all (ensemble pessimism on deaths)")
    p.add_argument("--obs-mode", choices=["latent", "latent_cell"],
                   help="actor-critic, cmaes, dagger: what the agent reads, latent = [z, h] (default) or latent_cell = "
                   "[z, c, h] with M's LSTM cell state (MDN-RNN bundles)")
    p.add_argument("--teacher", help="dagger: the policy to imitate (train-agent directory, controller, or shipped name "
                   "with --teacher-algo)")
    p.add_argument("--teacher-algo", choices=POLICY_ALGOS,
                   help="dagger: what saved the teacher, as compare's --algo")
    p.add_argument("--seed", type=int, help="training seed")
    p.set_defaults(func=cmd_train_agent)

    p = sub.add_parser("ensemble", help="combine actor-critics trained in one dream into one agent that acts on the "
                       "mean of their action distributions")
    p.add_argument("agents", nargs="+", help="actor-critic agent directories (dreamenv train-agent --algo actor-critic)")
    p.add_argument("--out", required=True, help="agent directory to write (members copied under it)")
    p.set_defaults(func=cmd_ensemble)

    p = sub.add_parser("dream", help="watch a dream: write a GIF of frames decoded by V")
    p.add_argument("bundle", help="bundle directory or shipped name")
    p.add_argument("--out", default="dream.gif", help="GIF to write (default dream.gif)")
    p.add_argument("--controller", help="controller to drive the dream (default: random actions)")
    p.add_argument("--temperature", type=float, help="dream temperature (default: the bundle's)")
    p.add_argument("--steps", type=int, default=300, help="at most this many steps (default 300)")
    p.add_argument("--scale", type=int, default=4, help="upscale factor of the 64x64 frames (default 4)")
    p.add_argument("--seed", type=int, default=0, help="dream seed")
    p.set_defaults(func=cmd_dream)

    p = sub.add_parser("fidelity", help="compare two world models on real episodes: open-loop error by horizon, reward, done")
    p.add_argument("bundle_a", help="bundle directory or shipped name (MDN-RNN or RSSM)")
    p.add_argument("bundle_b", help="another bundle of the same env")
    p.add_argument("data", nargs="+", help="rollout store(s) of that env; episodes either bundle trained on are skipped")
    p.add_argument("--horizon", type=int, default=50, help="open-loop steps per window (default 50)")
    p.add_argument("--stride", type=int, default=10, help="a window starts every this many steps (default 10)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature of the open-loop dream (default 1)")
    p.add_argument("--episodes", type=int, help="score at most this many episodes")
    p.add_argument("--all-episodes", action="store_true", help="also score episodes the bundles trained on")
    p.add_argument("--seed", type=int, default=0, help="seed of the dream's sampling")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--plot", help="also write a PNG of the errors against horizon (needs dreamenv[plot])")
    p.set_defaults(func=cmd_fidelity)

    p = sub.add_parser("pipeline", help="collect -> train -> controller -> evaluate from one recipe; resumes where it stopped")
    p.add_argument("config", help="TOML recipe, e.g. configs/vizdoom_takecover_quick.toml")
    p.set_defaults(func=cmd_pipeline)

    p = sub.add_parser("iterate", help="the paper's iterative procedure: collect with the controller (or an agent), retrain "
                       "M (or the RSSM), retrain C (or the agent)")
    p.add_argument("config", help="the recipe `dreamenv pipeline` ran ([iterate]: episodes, bundle, controller or agent (a "
                   "`dreamenv train-agent` directory, retrained each round from its recipe table such as [actor_critic]), "
                   "extra_data, name, seed: round k collects from seed + k x 1,000,000; epsilon: random-action probability while collecting; controller_warm_start: CMA-ES starts from the last round's C; MDN-RNN only: warm_start, mdn_epochs). A recipe "
                   "with `extends = \"other.toml\"` states only what differs from that one")
    p.add_argument("--rounds", type=int, default=1, help="rounds to run (each resumes where it stopped; default 1)")
    p.set_defaults(func=cmd_iterate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dreamenv` console script."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, ImportError, gym_error.Error) as err:
        print(f"dreamenv {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
