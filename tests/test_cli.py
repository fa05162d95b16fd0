"""The ``lightning-distill`` command line: config files, overrides, --print_config, errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("jsonargparse")  # the CLI's engine (the GPU image lacks it)

from lightning_distill import cli
from lightning_distill.cli import parse_lightning_config
from lightning_distill.errors import ConfigError, LightningDistillError
from lightning_distill.stages.pipeline import compose_run
from tests.helpers import flat_config

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "recipes" / "digits" / "experts.yaml")


def parsed(argv):
    """The configuration a subcommand would run, its model / data as init arguments."""
    return flat_config(parse_lightning_config(argv))


def _yaml(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return str(path)


def parse_run(argv):
    """The run recipe of a ``run`` command line (recipe names resolved)."""
    return compose_run(cli.prepare_argv(argv))


def one_line(err: str) -> str:
    """The one error line of ``err`` (stderr), checked to be one line."""
    lines = [ln for ln in err.strip().splitlines()
             if "no --config given" not in ln]  # the default recipe's note
    assert len(lines) == 1, lines
    return lines[0]


def settings(argv):
    """A LightningCLI subcommand's parsed configuration without its files' names."""
    config = parsed(argv).as_dict()
    config.pop("config", None)
    return config


def test_print_config_output_parses_back(tmp_path, capsys):
    argv = ["experts", "--config", DIGITS, "--trainer.max_epochs", "3", "--seed", "7",
            "--model.model_kwargs", "{width: 16, depth: 2}"]
    with pytest.raises(SystemExit) as exc:
        cli.main([*argv, "--print_config"])
    assert exc.value.code == 0
    printed = _yaml(tmp_path, "printed.yaml", capsys.readouterr().out)
    direct, again = settings(argv), settings(["experts", "--config", printed])
    assert again == direct
    assert (again["trainer"]["max_epochs"], again["seed"], again["model"]["model_kwargs"]) == (
        3, 7, {"width": 16, "depth": 2})


def test_dotted_overrides(tmp_path):
    cfg = parsed([
        "experts", "--config", DIGITS, "--num_experts", "3", "--trainer.devices", "2",
        "--data.root", str(tmp_path), "--store", "somewhere", "--model.dsa", "false"])
    assert cfg.num_experts == 3 and str(cfg.trainer.devices) == "2"
    assert cfg.data.root == str(tmp_path)
    assert cfg.store == "somewhere" and cfg.model.dsa is False
    base = parsed(["experts", "--config", DIGITS])
    # untouched keys keep the recipe's value
    assert cfg.trainer.max_epochs == base.trainer.max_epochs == 30
    assert cfg.trainer.callbacks == base.trainer.callbacks


def test_several_config_files_merge_in_order(tmp_path):
    a = _yaml(tmp_path, "a.yaml", "num_experts: 5\ntrainer:\n  max_epochs: 4\nseed: 3\n")
    b = _yaml(tmp_path, "b.yaml", "trainer:\n  max_epochs: 9\nseed: 4\n")
    cfg = parsed(["experts", "--config", DIGITS, "--config", a, "--config", b])
    assert (cfg.num_experts, cfg.trainer.max_epochs, cfg.seed) == (5, 9, 4)
    assert cfg.data.name == "digits"  # from the first file
    # an override after the files wins; one before them is overridden
    cfg = parsed(["experts", "--seed", "1", "--config", DIGITS, "--config", a,
                                  "--config", b, "--num_experts", "6"])
    assert (cfg.seed, cfg.num_experts) == (4, 6)


@pytest.mark.parametrize(
    ("text", "key", "suggestion"),
    [("num_expert: 3\n", "num_expert", "num_experts"),
     ("stor: here\n", "stor", "store"),
     ("trainer:\n  device: 2\n", "trainer.device", "trainer.devices"),
     ("model:\n  weight_decy: 2\n", "weight_decy", "weight_decay")],
)
def test_unknown_key_in_a_config_file_names_the_file_and_the_key(tmp_path, capsys, text, key,
                                                                   suggestion):
    bad = _yaml(tmp_path, "bad.yaml", text)
    assert cli.main(["experts", "--config", DIGITS, "--config", bad]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("lightning-distill experts: error:")
    assert bad in err and f"'{key}'" in err and f"did you mean '{suggestion}'" in err


def test_an_older_format_recipe_is_one_error_line_naming_the_file(tmp_path, capsys):
    """A recipe of the format before LightningCLI (``experts:`` / ``sharpness:`` sections,
    ``model: {name, kwargs}``) is refused in one line that names the file and the key."""
    old = _yaml(tmp_path, "old.yaml", "store: s\nexperts:\n  num_experts: 3\n  epochs: 7\n"
                "model:\n  name: ConvNet\n  kwargs:\n    width: 8\n"
                "sharpness:\n  method: gsam\n  rho: 0.02\ndata:\n  name: digits\n")
    assert cli.main(["experts", "--config", old]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"lightning-distill experts: error: {old}: ")
    assert "kwargs" in err and "model_kwargs" in err  # the key, and the module's own keys
    assert "Traceback" not in err
    # the same file as a run recipe: its top level is not a run's
    assert cli.main(["run", "--config", old]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"lightning-distill run: error: {old}: unknown key 'store'")


def test_run_recipe_keys_and_overrides(tmp_path, capsys):
    bad = _yaml(tmp_path, "run.yaml", "workdir: w\ndistil:\n  - name: ipc1\n")
    assert cli.main(["run", "--config", bad]) == 2
    err = capsys.readouterr().err
    assert bad in err and "unknown key 'distil'" in err and "did you mean 'distill'" in err
    recipe = parse_run(["run", "--config", "digits/quickstart",
                            "--distill.ipc10.model.iterations", "7", "--experts.group_size",
                            "1", "--workdir=/tmp/x"])
    assert recipe["distill"][1]["model"]["iterations"] == 7
    assert recipe["experts"]["group_size"] == 1 and recipe["workdir"] == "/tmp/x"
    with pytest.raises(ConfigError, match="no entry 'ipc5'"):
        parse_run(["run", "--config", "digits/quickstart", "--distill.ipc5.model.ipc", "5"])
    with pytest.raises(ConfigError, match="did you mean 'workdir'"):
        parse_run(["run", "--workdirr", "x"])


@pytest.mark.parametrize("recipe", ["digits/quickstart", "fashion_mnist_cpu/run"])
def test_run_print_config_parses_back_and_every_section_parses(recipe, tmp_path, capsys):
    from lightning_distill.stages.pipeline import stage_configs

    with pytest.raises(SystemExit) as exc:
        cli.main(["run", "--config", recipe, "--print_config"])
    assert exc.value.code == 0
    printed = _yaml(tmp_path, "printed.yaml", capsys.readouterr().out)
    assert parse_run(["run", "--config", printed]) == parse_run(["run", "--config", recipe])
    stages = stage_configs(parse_run(["run", "--config", printed]))
    assert [s for s, _, _ in stages][0] == "experts" and stages[-1][0] == "evaluate"
    for k, (sub, _, cfg) in enumerate(stages):  # each merged section is a valid config
        path = _yaml(tmp_path, f"{k}.yaml", json.dumps(cfg))
        parsed([sub, "--config", path])


def test_run_seeds_entry_becomes_one_distillation_per_seed(tmp_path):
    from lightning_distill.stages.pipeline import stage_configs

    recipe = _yaml(tmp_path, "seeds.yaml", "workdir: " + str(tmp_path / "w") + """
seed: 7
distill:
- {name: ipc1, seeds: [0, 2], model: {ipc: 1, iterations: 5}}
- {name: ipc10, model: {ipc: 10}}
""")
    stages = stage_configs(parse_run(["run", "--config", "digits/quickstart",
                                      "--config", recipe, "--distill.ipc1.model.iterations",
                                      "9"]))
    distills = {label: cfg for sub, label, cfg in stages if sub == "distill"}
    assert list(distills) == ["distill ipc1_s0", "distill ipc1_s2", "distill ipc10"]
    for seed in (0, 2):
        cfg = distills[f"distill ipc1_s{seed}"]
        assert cfg["seed_everything"] == seed and cfg["model"]["seed"] == seed
        assert cfg["model"]["iterations"] == 9 and cfg["model"]["ipc"] == 1
        assert cfg["output"] == str(tmp_path / "w" / f"ipc1_s{seed}")
        assert "seeds" not in cfg and "name" not in cfg
    # an entry without seeds keeps the run's seed
    assert distills["distill ipc10"]["seed_everything"] == 7
    assert distills["distill ipc10"]["model"]["seed"] == 7
    ev = stages[-1][2]
    assert ev["synthetic"] == [str(tmp_path / "w" / n / "synthetic.pt")
                               for n in ("ipc1_s0", "ipc1_s2", "ipc10")]
    for sub, _, cfg in stages:  # every expanded section is a valid config
        if sub == "distill":
            parsed([sub, "--config", _yaml(tmp_path, "d.yaml", json.dumps(cfg))])


@pytest.mark.parametrize(("entry", "message"), [
    ("{name: a, seeds: []}", "`seeds` must be a non-empty list of distinct integers"),
    ("{name: a, seeds: [1, 1]}", "`seeds` must be a non-empty list of distinct integers"),
    ("{name: a, seeds: 3}", "`seeds` must be a non-empty list of distinct integers"),
    ("{name: a, seeds: [0], model: {seed: 4}}", "give `seeds` or `seed_everything`"),
    ("{name: a, seeds: [0], seed_everything: 4}", "give `seeds` or `seed_everything`"),
    ("{name: a, seeds: [0], output: x}", "drop `output`")])
def test_run_seeds_entry_errors_name_the_entry(tmp_path, entry, message):
    from lightning_distill.stages.pipeline import stage_configs

    recipe = _yaml(tmp_path, "bad.yaml", f"distill:\n- {entry}\n")
    with pytest.raises(LightningDistillError) as exc:
        stage_configs(parse_run(["run", "--config", recipe]))
    assert "distill[0] ('a')" in str(exc.value) and message in str(exc.value)


def test_fashion_mnist_cpu_recipe_is_the_round_2_benchmarks_settings(tmp_path):
    """recipes/fashion_mnist_cpu/run.yaml runs every distillation exactly as
    benchmarks/fashion_mnist_r2.sh did (its configs plus the script's overrides), so the
    committed sets are the recipe's and `run` resumes from them."""
    from lightning_distill.stages.pipeline import stage_configs

    stages = stage_configs(parse_run(["run", "--config", "fashion_mnist_cpu/run"]))
    distills = [(label.split()[1], cfg) for sub, label, cfg in stages if sub == "distill"]
    assert [n for n, _ in distills] == [f"ipc{i}_s{s}" for i in (1, 10, 50) for s in range(3)]
    labels = {"hard": ["--model.label_init", "hard", "--model.learn_labels", "false",
                       "--model.image_init", "real"],
              "soft": ["--model.label_init", "soft", "--model.learn_labels", "true",
                       "--model.image_init", "samples_predicted_correctly"]}
    for name, cfg in distills:
        ipc, seed = name.split("_s")
        script = ["distill", "--config", str(ROOT / f"benchmarks/fashion_mnist_r2_{ipc}.yaml"),
                  "--model.store", cfg["model"]["store"], "--output", cfg["output"],
                  *labels["hard" if ipc == "ipc1" else "soft"],
                  "--seed_everything", seed, "--model.seed", seed]
        if ipc == "ipc1":  # the pilot's choice, which the script passes
            script += ["--model.lr_teacher", "0.1"]
        ours = parsed(["distill", "--config", _yaml(tmp_path, "d.yaml", json.dumps(cfg))])
        theirs = parsed(script)
        for c in (ours, theirs):
            c.pop("config", None)
            c["trainer"].pop("enable_progress_bar", None)  # the script's quiet log
        assert ours == theirs, name
    # the full-data row: the largest budget `fashion_mnist_r2.sh full` measured, with the
    # lr and batch size it measured them at
    curve = json.loads((ROOT / "benchmarks/artifacts/fashion_mnist_r2/full_curve.json")
                       .read_text())
    (evaluate,) = [cfg for sub, _, cfg in stages if sub == "evaluate"]
    budget = max(curve, key=int)
    measured = curve[budget]["settings"]
    assert evaluate["full_epochs"] == int(budget)
    assert (evaluate["full_lr"], evaluate["full_batch_size"]) == (measured["lr"],
                                                                 measured["batch_size"])


def test_run_checks_every_section_before_any_work(tmp_path, capsys):
    # a typo in the last section fails before any work
    bad = _yaml(tmp_path, "bad.yaml", "workdir: " + str(tmp_path / "w")
                + "\nevaluate:\n  runz: 3\n")
    assert cli.main(["run", "--config", "digits/quickstart", "--config", bad]) == 2
    assert "runz" in capsys.readouterr().err
    assert not (tmp_path / "w" / "experts").exists()


def test_unknown_or_abbreviated_command_line_options_fail(capsys):
    for option in ("--num_expert", "--trainer.max_epoch"):  # typo; abbreviation
        assert cli.main(["experts", "--config", DIGITS, option, "3"]) == 2
        err = one_line(capsys.readouterr().err)
        assert err.startswith("lightning-distill experts: error:")
        assert option.lstrip("-") in err


@pytest.mark.parametrize(("stage", "option", "message"), [
    ("distill", "--model.ipcc", "key 'model': Option 'ipcc' is not accepted by "
     "DistillationModule (did you mean 'ipc'?)"),
    ("experts", "--model.init_args.lrr", "key 'model': Option 'lrr' is not accepted by "
     "ExpertTrajectoryModule (did you mean 'lr'?)"),
    ("evaluate", "--data.nme", "key 'data': Option 'nme' is not accepted by RealDataModule "
     "(did you mean 'name'?)")])
def test_a_misspelt_module_option_is_one_line_with_a_close_match(stage, option, message,
                                                                 capsys):
    """Subclass mode would report it as a page about Union subtypes."""
    assert cli.main([stage, option, "3"]) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"lightning-distill {stage}: error: the command line: {message}")
    # a user's own class takes its own arguments: not checked against ours
    group = option[2:].split(".")[0]
    assert cli.main([stage, f"--{group}.class_path", "my.Module", option, "3"]) == 2
    assert "did you mean" not in capsys.readouterr().err


@pytest.mark.parametrize(("stage", "usage", "key"), [
    ("experts", "[options] experts", "--num_experts"),
    ("distill", "[options] distill", "--output"),
    ("evaluate", "[options] evaluate", "--synthetic"),
    ("run", "run [--config FILE|RECIPE ...]", "--workdir")])
def test_stage_help(stage, usage, key, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: lightning-distill {usage}" in out and key in out


@pytest.mark.parametrize(("stage", "model", "key"), [
    ("experts", "ExpertTrajectoryModule", "--model.lr"),
    ("distill", "DistillationModule", "--model.ipc"),
    ("evaluate", "EvalModule", "--model.protocol")])
def test_stage_help_points_to_the_module_arguments(stage, model, key, capsys):
    """Subclass mode lists `--model` as one option: the help says where its arguments are,
    and `--model.help CLASS` lists them."""
    with pytest.raises(SystemExit):
        cli.main([stage, "--help"])
    assert f"--model.help {model}" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit) as exc:
        cli.main([stage, "--model.help", model])
    assert exc.value.code == 0 and key in capsys.readouterr().out


def test_main_runs_the_stage_with_the_parsed_config(monkeypatch):
    import lightning_distill.stages.experts as stage

    seen = []
    monkeypatch.setattr(stage, "run_experts", lambda plan, dm: seen.append((plan, dm)))
    assert cli.main(["experts", "--config", DIGITS, "--num_experts", "2"]) == 0
    ((plan, dm),) = seen
    assert isinstance(plan, stage.ExpertPlan) and plan.num_experts == 2 and plan.epochs == 30
    assert plan.module_kwargs["dsa_flip"] is False  # digits: no flip
    assert dm.name == "digits" and dm.train_set is not None


def test_bad_input_in_a_stage_is_one_error_line_with_exit_status_2(tmp_path, capsys,
                                                                     monkeypatch):
    argv = ["experts", "--config", DIGITS, "--data.name", "cifar10", "--data.root",
            str(tmp_path), "--store", str(tmp_path / "store")]
    monkeypatch.delenv("LIGHTNING_DISTILL_TRACEBACK", raising=False)
    assert cli.main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith("lightning-distill experts: error:") and "cifar10" in err
    assert str(tmp_path) in err and "Traceback" not in err
    assert "LIGHTNING_DISTILL_TRACEBACK=1" in err
    monkeypatch.setenv("LIGHTNING_DISTILL_TRACEBACK", "1")
    with pytest.raises(LightningDistillError):
        cli.main(argv)


def test_repeated_lightning_info_lines_pass_once():
    import logging

    from lightning_distill.stages._common import _OnceFilter

    f = _OnceFilter()

    def record(level, msg):
        return logging.LogRecord("pytorch_lightning", level, __file__, 1, msg, None, None)

    assert f.filter(record(logging.INFO, "GPU available: False"))
    assert not f.filter(record(logging.INFO, "GPU available: False"))
    assert f.filter(record(logging.INFO, "TPU available: False"))
    assert f.filter(record(logging.WARNING, "careful"))
    assert f.filter(record(logging.WARNING, "careful"))  # warnings are never dropped


def test_config_names_a_packaged_recipe_from_any_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no recipes/ folder here
    recipes = cli.packaged_recipes()
    assert "digits/quickstart" in recipes and "cifar10/ipc10" in recipes
    # the checkout's recipes/ is the packaged folder
    assert sorted(recipes) == sorted(f"{p.parent.name}/{p.stem}"
                                     for p in (ROOT / "recipes").glob("*/*.yaml"))
    for value in ("digits/experts", "digits/experts.yaml", "recipes/digits/experts.yaml"):
        assert Path(cli.resolve_config(value)).samefile(ROOT / "recipes/digits/experts.yaml")
    by_name = settings(["experts", "--config", "digits/experts"])
    by_path = settings(["experts", f"--config={ROOT / 'recipes/digits/experts.yaml'}"])
    assert by_name == by_path
    # a local file wins over a packaged recipe of the same name
    local = tmp_path / "digits" / "experts.yaml"
    local.parent.mkdir()
    local.write_text("seed: 99\n", encoding="utf-8")
    assert cli.resolve_config("digits/experts.yaml") == "digits/experts.yaml"


@pytest.mark.parametrize("stage", ["experts", "distill", "evaluate"])
def test_without_config_a_lightning_subcommand_reads_its_digits_recipe(stage, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = cli.DEFAULT_RECIPES[stage]
    assert recipe.startswith("digits/")
    assert settings([stage]) == settings([stage, "--config", recipe])
    assert parsed([stage, "--seed_everything", "3"]).seed_everything == 3


def test_without_config_run_reads_the_quickstart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert cli.DEFAULT_RECIPES["run"] == "digits/quickstart"
    argv = cli.prepare_argv(["run"])
    assert compose_run(argv) == parse_run(["run", "--config", "digits/quickstart"])
    assert cli.default_recipe(["run", "--config", "x.yaml"]) is None
    assert cli.default_recipe(["run", "--help"]) is None


def test_main_says_which_recipe_it_uses_without_config(monkeypatch, capsys):
    import lightning_distill.stages.pipeline as stage

    seen = []
    monkeypatch.setattr(stage, "run_pipeline", lambda argv, **kw: seen.append(argv))
    assert cli.main(["run"]) == 0
    assert "packaged recipe digits/quickstart" in capsys.readouterr().err
    assert compose_run(seen[0])["experts"]["num_experts"] == 8  # the quickstart's


def test_missing_config_file_lists_the_packaged_recipes(tmp_path, capsys):
    assert cli.main(["experts", "--config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err
    assert "nope.yaml: no such file" in err and "digits/quickstart" in err


def test_console_script_help():
    exe = Path(sys.executable).with_name("lightning-distill")
    if not exe.exists():
        pytest.skip("console script not installed")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = subprocess.run([str(exe), "run", "--help"], capture_output=True, text=True,
                         env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--workdir" in out.stdout


RECIPES = sorted((ROOT / "recipes").glob("*/*.yaml"))


def _stage_of(path: Path) -> str:
    if path.name.startswith("experts"):
        return "experts"
    if path.name.startswith("evaluate"):
        return "evaluate"
    if path.name in ("quickstart.yaml", "run.yaml"):
        return "run"
    return "distill"


def load(path: Path):
    """The parsed configuration of a packaged recipe: the LightningCLI Namespace of its
    subcommand, or for a ``run`` recipe its composed recipe (with its ``data``)."""
    stage = _stage_of(path)
    if stage == "run":
        recipe = parse_run(["run", "--config", str(path)])
        return SimpleNamespace(data=SimpleNamespace(**recipe["data"]), recipe=recipe)
    return parsed([stage, "--config", str(path)])


def callback(cfg, name: str):
    """The init_args of the ``name`` callback of a distill recipe (None without one)."""
    hits = [cb.init_args for cb in cfg.trainer.callbacks if cb.class_path.endswith(f".{name}")]
    return hits[0] if hits else None


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_recipe_parses_into_its_stage_config(path):
    cfg = load(path)
    # a folder is its data set's (fashion_mnist_cpu: Fashion-MNIST sized for a CPU;
    # imagenet_subsets: the six subsets of the imagenet_subset data set)
    folder = {"imagenet_subsets": "imagenet_subset"}.get(path.parent.name, path.parent.name)
    assert folder.split("_cpu")[0] == cfg.data.name
    if _stage_of(path) == "distill":  # T+ of the module's check is the window's
        assert cfg.model.max_start_epoch == callback(cfg, "MatchingWindow").max_start_epoch


def test_distill_recipes_hold_the_published_datm_rows():
    """Spot checks against docs/method.md, 'Published settings' (DATM) and the FTD/MTT variants."""
    def get(name):
        return load(ROOT / "recipes" / name)

    c = get("cifar10/ipc10.yaml")
    d, w = c.model, callback(c, "MatchingWindow")
    assert (d.syn_steps, d.expert_epochs, d.lr_img, d.lr_lr, d.lr_y, d.batch_syn) == (
        80, 2, 100, 1e-5, 2, 100)
    assert (w.min_start_epoch, w.current_max_start_epoch, w.max_start_epoch,
            w.expansion_end, w.sequential) == (0, 10, 20, 1000, True)
    assert (d.threshold, d.image_init, d.learn_labels, d.iterations) == (
        1.0, "samples_predicted_correctly", True, 10000)
    assert c.data.zca
    c1 = get("cifar10/ipc1.yaml")
    w1 = callback(c1, "MatchingWindow")
    assert (c1.model.threshold, w1.max_start_epoch, w1.sequential) == (1.1, 4, False)
    c100 = get("cifar100/ipc50.yaml")
    assert (c100.model.image_init, callback(c100, "MatchingWindow").min_start_epoch,
            c100.model.mode) == ("real", 20, "recompute")
    tiny = get("tiny_imagenet/ipc1.yaml")
    assert (tiny.model.lr_img, tiny.model.lr_lr,
            callback(tiny, "MatchingWindow").current_max_start_epoch) == (10000, 1e-4, 15)
    ftd = get("cifar10/ftd_ipc10.yaml")
    ema = callback(ftd, "SyntheticEMA")
    assert ema is not None and ema.decay == 0.9995 and not ftd.model.learn_labels
    assert (ftd.model.syn_steps, ftd.model.lr_teacher, ftd.model.iterations) == (
        30, 0.001, 5000)
    assert callback(get("cifar10/ipc10.yaml"), "SyntheticEMA") is None
    mtt = get("cifar10/mtt_ipc50.yaml")
    assert not mtt.data.zca and mtt.model.store.endswith("experts_mtt_nozca")


def test_tiny_imagenet_recipes_use_zca_as_datm():
    """Every DATM TinyImageNet config sets zca: True: experts, distillation, evaluation."""
    for name in ("experts", "ipc1", "ipc10", "ipc50", "evaluate"):
        assert load(ROOT / "recipes" / "tiny_imagenet" / f"{name}.yaml").data.zca, name


def test_ftd_recipes_match_ftds_own_experts():
    """FTD's buffers: GSAM alpha 0.4, 50 epochs; its distillation recipes read that store
    and their windows (T+ - 1 + M) stay inside its 51 snapshots."""
    for ds in ("cifar10", "cifar100"):
        ex = load(ROOT / f"recipes/{ds}/experts_ftd.yaml")
        gsam = callback(ex, "GSAM")
        assert (gsam.alpha, gsam.rho) == (0.4, 0.01)
        assert ex.trainer.max_epochs == 50 and ex.store == f"outputs/{ds}/experts_ftd"
        for path in sorted((ROOT / "recipes" / ds).glob("ftd_ipc*.yaml")):
            cfg = load(path)
            assert cfg.model.store == ex.store, path.name
            assert cfg.model.max_start_epoch - 1 + cfg.model.expert_epochs <= ex.trainer.max_epochs


def test_pad_recipes_hold_pads_parameter_ratios_on_datm_rows():
    ratios = {"cifar10": {1: 0, 10: 0.25, 50: 0.25, 500: 0.5, 1000: 0.75},
              "cifar100": {1: 0, 10: 0.25, 50: 0.5, 100: 0.5},
              "tiny_imagenet": {1: 0, 10: 0.25, 50: 0.5}}
    for ds, rows in ratios.items():
        for ipc, a in rows.items():
            recipes = ROOT / "recipes" / ds
            pad = load(recipes / f"pad_ipc{ipc}.yaml")
            datm = load(recipes / f"ipc{ipc}.yaml")
            assert pad.model.param_drop_ratio == a and pad.model.param_mask is None
            assert pad.model.store == f"outputs/{ds}/experts_pad"
            # everything else is DATM's row
            for key in ("syn_steps", "expert_epochs", "lr_img", "lr_lr", "lr_y", "batch_syn",
                        "threshold", "image_init", "learn_labels", "iterations", "mode",
                        "max_start_epoch"):
                assert pad.model[key] == datm.model[key], (ds, ipc, key)
            assert (callback(pad, "MatchingWindow") == callback(datm, "MatchingWindow")
                    and pad.data == datm.data)


def test_top_level_help_and_unknown_subcommand(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {sub}" in out for sub in ("experts", "distill", "evaluate", "run", "fit"))
    assert cli.main(["evaluat"]) == 2
    assert "unknown subcommand 'evaluat' (did you mean 'evaluate'?)" in capsys.readouterr().err


def test_imagenet_recipes_stream_prepared_data_and_fit_their_experts():
    """ImageNet at the papers' scales (issue 29): every stage reads the prepared data and
    streams it; TESLA's recipes run the tesla mode with one expert's soft labels; every
    window (T+ - 1 + M) stays inside the experts' snapshots."""
    for ds, rows in (("imagenet64", ("ipc1", "ipc10", "ipc50")),
                     ("imagenet_subsets", ("ipc1", "ipc10"))):
        recipes = ROOT / "recipes" / ds
        ex = load(recipes / "experts.yaml")
        for name in ("experts", "evaluate", *rows):
            cfg = load(recipes / f"{name}.yaml")
            assert cfg.data.prepared and cfg.data.hold is False, (ds, name)
            assert cfg.data.dataset_kwargs == ex.data.dataset_kwargs, (ds, name)
        for name in rows:
            d = load(recipes / f"{name}.yaml").model
            assert d.store == ex.store, (ds, name)
            assert d.max_start_epoch - 1 + d.expert_epochs <= ex.trainer.max_epochs
            if ds == "imagenet64":
                assert (d.mode, d.label_init, d.label_experts, d.learn_labels) == (
                    "tesla", "soft", 1, False)
                assert (d.syn_steps, d.expert_epochs, d.max_start_epoch, d.lr_img, d.lr_lr,
                        d.lr_teacher, d.batch_syn) == (10, 3, 10, 10000, 1e-4, 0.01, 100)
            else:
                assert (d.label_init, d.syn_steps, d.expert_epochs, d.max_start_epoch) == (
                    "hard", 20, 2, 10)
    sub = load(ROOT / "recipes/imagenet_subsets/experts.yaml")
    assert sub.data.dataset_kwargs == {"subset": "imagenette", "image_size": 128,
                                       "resize": "stretch"}
    assert (sub.model.model, sub.num_experts, sub.trainer.max_epochs) == ("ConvNetD5", 100, 50)
