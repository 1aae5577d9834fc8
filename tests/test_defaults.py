"""The published settings are every script's defaults (utils/recipes.py): parsed values, --help,
--recipe eigendamage, explicit flags over a recipe, milestones scaled with the epochs, benches
that set their own defaults, and the full settings in results.json / summary.json."""
import argparse
import importlib.util
import json
import re
from pathlib import Path

import pytest

from utils import cli, recipes

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ("train_prune.py", "iterative_prune.py", "train_unstructured_prune.py", "prune_imagenet.py")


def module(path):
    spec = importlib.util.spec_from_file_location(Path(path).stem, REPO / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def parsed(script, *argv):
    return cli.parse(module(script).build_parser(), [str(a) for a in argv])


# The published OBA code's defaults (github NEU-REAL/OBA), script by script.
ONE_SHOT = dict(recipe="oba", num_epochs=200, batch_size=64, lr=0.1, weight_decay=5e-4,
                milestones=[60, 100, 150], lr_gamma=0.1, momentum=0.9, iters_per_step=200,
                iterative_steps=50, max_pruning_ratio=0.95, sl_num_epochs=150, sl_lr=1e-3,
                sl_weight_decay=1e-4, sl_milestones=[80, 120], importance_type="OBA",
                normalizer="max", delta=0.0, upward_delta=1.0, downward_delta=1.0,
                parallel_delta=1.0, order=2, fastoba_delta=1.0, multivariable=True)
EXPECTED = {
    "train_prune.py": dict(ONE_SHOT, ops_ratios=[0.14]),
    "iterative_prune.py": dict(ONE_SHOT, sl_num_epochs=100, sl_milestones=[50, 75],
                               ops_ratios=[0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05]),
    "train_unstructured_prune.py": dict(ONE_SHOT, batch_size=32, iterative_steps=49,
                                        pruning_ratio=None),
    "prune_imagenet.py": dict(iters_per_step=350, iterative_steps=50, importance_batch_size=2,
                              batch_size=64, max_pruning_ratio=0.95, ops_ratios=[0.51],
                              importance_type="OBA", model="vit_b_16", weights="IMAGENET1K_V1"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_published_defaults(script):
    args = parsed(script)
    got = {k: getattr(args, k) for k in EXPECTED[script]}
    assert got == EXPECTED[script]


def _flat(text):
    return re.sub(r"\s+", " ", text)


def test_help_shows_every_default():
    for script in SCRIPTS:
        p = module(script).build_parser()
        text = _flat(p.format_help())
        formatter = p._get_formatter()
        for action in p._actions:
            if action.option_strings and action.dest != "help":
                assert "default" in formatter._expand_help(action), (script, action.dest)
        assert "(default: 0.95)" in text
        if script == "prune_imagenet.py":
            assert "(default: 350)" in text and "(default: 2)" in text
            continue
        assert "--recipe {eigendamage,oba}" in text and "(default: oba)" in text
        assert "(default: oba: 200; eigendamage: 150)" in text  # --num_epochs
        assert "(default: oba: 0.0005; eigendamage: 0.0002)" in text  # --weight_decay
        assert "(default: oba: 60 100 150 of 200 epochs; eigendamage: 75 112 of 150 epochs)" in text
        assert "(default: 200)" in text  # --iters_per_step
    text = _flat(module("iterative_prune.py").build_parser().format_help())
    assert "(default: oba: 100; eigendamage: 150)" in text  # --sl_num_epochs
    assert "(default: oba: 50 75 of 100 epochs; eigendamage: 75 112 of 150 epochs)" in text
    text = _flat(module("train_prune.py").build_parser().format_help())
    assert "(default: 150)" in text  # --sl_num_epochs: both recipes
    assert "(default: oba: 80 120 of 150 epochs; eigendamage: 75 112 of 150 epochs)" in text


def test_recipe_eigendamage():
    args = parsed("train_prune.py", "--recipe", "eigendamage")
    assert (args.num_epochs, args.lr, args.weight_decay, args.milestones) == (150, 0.1, 2e-4, [75, 112])
    assert (args.sl_num_epochs, args.sl_lr, args.sl_weight_decay, args.sl_milestones) == (
        150, 1e-3, 1e-4, [75, 112])
    assert (args.batch_size, args.iters_per_step, args.iterative_steps) == (64, 200, 50)
    args = parsed("iterative_prune.py", "--recipe", "eigendamage")
    assert (args.sl_num_epochs, args.sl_milestones) == (150, [75, 112])
    with pytest.raises(SystemExit):
        parsed("train_prune.py", "--recipe", "nope")


def test_explicit_flags_beat_the_recipe():
    args = parsed("train_prune.py", "--recipe", "eigendamage", "--weight_decay", "1e-3",
                  "--num_epochs", "10", "--milestones", "9", "4", "--sl_lr", "0.02",
                  "--sl_milestones", "7")
    assert (args.weight_decay, args.num_epochs, args.milestones) == (1e-3, 10, [4, 9])
    assert (args.sl_lr, args.sl_milestones, args.sl_num_epochs) == (0.02, [7], 150)
    args = parsed("iterative_prune.py", "--sl_num_epochs", "150", "--sl_weight_decay", "0")
    assert (args.sl_num_epochs, args.sl_weight_decay, args.sl_milestones) == (150, 0.0, [75, 112])


@pytest.mark.parametrize("script, argv, dest, expected", [
    ("train_prune.py", ["--num_epochs", "20"], "milestones", [6, 10, 15]),          # 30/50/75 %
    ("train_prune.py", ["--num_epochs", "3"], "milestones", [1, 2]),                # at least 1
    ("train_prune.py", ["--sl_num_epochs", "30"], "sl_milestones", [16, 24]),       # 80/150, 120/150
    ("train_prune.py", ["--sl_num_epochs", "3"], "sl_milestones", [1, 2]),
    ("iterative_prune.py", ["--sl_num_epochs", "10"], "sl_milestones", [5, 7]),     # 50/75 %
    ("train_prune.py", ["--recipe", "eigendamage", "--num_epochs", "10"], "milestones", [5, 7]),
    ("train_unstructured_prune.py", ["--num_epochs", "100"], "milestones", [30, 50, 75]),
])
def test_milestones_scale_with_the_epochs(script, argv, dest, expected):
    assert getattr(parsed(script, *argv), dest) == expected


def test_milestones_scaling_rule():
    m = recipes.Milestones((60, 100, 150), of=200)
    assert m.scaled(200) == [60, 100, 150] and m.scaled(40) == [12, 20, 30] and m.scaled(1) == [1]
    assert recipes.Milestones((80, 120), of=150).scaled(150) == [80, 120]


def test_benches_keep_their_own_settings():
    args = module("bench/criteria_table.py").parse([])
    assert (args.iters_per_step, args.iterative_steps, args.sl_num_epochs, args.sl_lr) == (10, 16, 2, 0.01)
    assert args.milestones is None and args.sl_milestones is None
    assert args.batch_size == 64 and args.weight_decay == 5e-4
    assert cli.default_milestones(args.pretrain_epochs, args.milestones) == [4, 6]
    args = module("bench/unstructured_table.py").parse([])
    assert (args.num_epochs, args.iters_per_step, args.iterative_steps, args.milestones) == (10, 4, 2, None)


def test_demo_passes_its_own_settings():
    make = (REPO / "Makefile").read_text()
    demo = _flat(make.split("\ndemo:")[1].split("\n\n")[0]).replace("\\", "")
    argv = demo.split("train_prune.py", 1)[1].split()
    args = parsed("train_prune.py", *argv)
    assert (args.num_epochs, args.lr, args.milestones, args.weight_decay, args.batch_size) == (
        10, 0.05, [5, 7], 5e-4, 64)
    assert (args.sl_num_epochs, args.sl_lr, args.sl_milestones, args.sl_weight_decay) == (
        3, 0.01, [1, 2], 5e-4)
    assert (args.iterative_steps, args.iters_per_step) == (8, 4)


def test_grid_demo_flags_are_valid():
    """`make grid-demo`'s command line parses, its flags after `--` included."""
    import compare
    make = (REPO / "Makefile").read_text()
    demo = _flat(make.split("\ngrid-demo:")[1].split("\n\n")[0]).replace("\\", "")
    args = compare.parse(demo.split("compare.py", 1)[1].split())
    assert args.dataset == "digits" and args.mode == "oneshot"
    for criterion, extra in args.series.values():
        run = compare.base_args(args, criterion, extra)
        assert (run.sl_num_epochs, run.iterative_steps, run.iters_per_step) == (2, 4, 2)


def test_settings_record_keeps_every_value():
    ns = argparse.Namespace(a=(1, 2), b=Path("x/y"), c={"k": (3,)}, d=None, e=0.5, f=[Path("z")])
    assert cli.settings(ns) == {"a": [1, 2], "b": "x/y", "c": {"k": [3]}, "d": None, "e": 0.5,
                                "f": ["z"]}


def test_results_record_the_full_settings(tmp_path):
    argv = ["--model", "resnet8", "--num_epochs", "0", "--sl_num_epochs", "1", "--batch_size", "256",
            "--iterative_steps", "1", "--iters_per_step", "1", "--bn_recalibration_batches", "1",
            "--importance_type", "Weight", "--ops_ratios", "0.8", "--recipe", "eigendamage",
            "--weight_decay", "3e-4", "--no-progress", "--no-tensorboard", "--device", "cpu",
            "--output_dir", str(tmp_path / "out"), "--save_path_prefix", str(tmp_path / "ckpt")]
    mod = module("train_prune.py")
    assert mod.main(argv) == 0
    record = json.loads((tmp_path / "out" / "ops_0.8" / "results.json").read_text())
    settings = record["settings"]
    dests = {a.dest for a in mod.build_parser()._actions if a.dest != "help"}
    assert dests <= set(settings)
    assert settings["recipe"] == "eigendamage" and settings["weight_decay"] == 3e-4
    assert settings["milestones"] == [1] and settings["sl_milestones"] == [1]  # scaled, at least 1
    assert (settings["sl_num_epochs"], settings["sl_lr"], settings["sl_weight_decay"]) == (1, 1e-3, 1e-4)
    assert settings["iters_per_step"] == 1 and settings["max_pruning_ratio"] == 0.95
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary[0]["settings"] == settings
