"""Determinism on the CPU: the same seed gives bitwise the same scores, masks, weights and metrics
for every criterion of the registry, through the code path the scripts use (pruners.workflow);
a different seed changes what is sampled (Random's scores, the true Fisher's labels), so the
equalities are not vacuous; `--deterministic` sets torch's switches and changes no CPU result."""
import copy
import json
import os

import pytest
import torch
import torch.nn as nn

from helpers import run_script
from models import get_model
from pruners import workflow
from pruners.driver import channel_widths
from pruners.registry import available_methods, get_method
from utils import cli
from utils.flops import count_macs

CRITERIA = ("OBA", "fastOBA", "Weight", "Taylor", "Random", "C-OBD", "C-OBS", "Kron-OBD",
            "Kron-OBS", "Eigen", "Slim")
TARGET = 0.7
# Small everything: two pruning steps of two importance batches of 32 digits images.
TINY = ["--model", "resnet8", "--batch_size", "32", "--iterative_steps", "2",
        "--iters_per_step", "2", "--bn_recalibration_batches", "2", "--no-progress",
        "--no-tensorboard"]


def _args(method, tmp_path, seed=0, extra=()):
    p = cli.parser("determinism test")
    cli.add_common(p)
    cli.add_pruning(p)
    return cli.parse(p, [*TINY, "--importance_type", method, "--seed", str(seed),
                         "--output_dir", str(tmp_path / "out"),
                         "--save_path_prefix", str(tmp_path / "ckpt"), *extra])


@pytest.fixture(scope="module")
def dense():
    """One untrained resnet8 with distinct BatchNorm scales (NN Slimming would see only ties)."""
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.weight.shape, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5)
    return model


def _scores_and_pruned(args, dense):
    """What a script does for one target (setup, reseed, prune, measure), plus the scores the
    criterion gives the dense network on the first importance batches."""
    ctx = workflow.setup(args)
    method = get_method(args.importance_type)
    workflow.reseed(ctx)
    batches = list(ctx.batches(args.iters_per_step)) if method.needs_data else []
    options = cli.method_options(args, method)
    scores = method.score(copy.deepcopy(dense), batches, nn.CrossEntropyLoss(), args.score_mode,
                          **options)
    model = copy.deepcopy(dense)
    reference = count_macs(model, ctx.example_inputs[:1])
    pruned, info = workflow.prune_and_measure(ctx, model, TARGET, reference,
                                              channel_widths(model))
    metrics = {k: v for k, v in info.items() if not k.startswith("seconds")}
    return scores, pruned, metrics


def _assert_same_state(a: nn.Module, b: nn.Module):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].shape == sb[k].shape, k
        assert torch.equal(sa[k], sb[k]), k


def test_every_registered_criterion_is_covered():
    assert set(available_methods()) == set(CRITERIA)


@pytest.mark.parametrize("method", CRITERIA)
def test_same_seed_same_scores_masks_weights_metrics(method, dense, tmp_path):
    torch.set_num_threads(1)
    s1, m1, r1 = _scores_and_pruned(_args(method, tmp_path), dense)
    s2, m2, r2 = _scores_and_pruned(_args(method, tmp_path), dense)
    assert s1 and list(s1) == list(s2)
    for k in s1:
        assert torch.equal(s1[k], s2[k]), k
    _assert_same_state(m1, m2)
    assert r1 == r2
    # it really pruned, and to the target
    macs = count_macs(m1, torch.zeros(1, 3, 32, 32))
    assert 0 < macs <= TARGET * count_macs(dense, torch.zeros(1, 3, 32, 32))


@pytest.mark.parametrize("method", ["Random", "C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS"])
def test_another_seed_changes_the_sampled_scores(method, dense, tmp_path):
    """Random's scores follow --seed; the true Fisher samples labels from the global RNG, which
    setup/reseed seed: on the same batches, another seed gives other scores."""
    torch.set_num_threads(1)
    spec = get_method(method)
    ctx = workflow.setup(_args(method, tmp_path))
    workflow.reseed(ctx)
    batches = list(ctx.batches(2)) if spec.needs_data else []

    def scores(seed):
        args = _args(method, tmp_path, seed=seed)
        workflow.seed_everything(seed)
        return spec.score(copy.deepcopy(dense), batches, nn.CrossEntropyLoss(),
                          **cli.method_options(args, spec))

    a, b, c = scores(0), scores(0), scores(1)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a)
    if method != "Random":  # the empirical Fisher does not sample: its scores follow the data only
        spec_args = _args(method, tmp_path, extra=["--fisher_type", "empirical"])
        opts = cli.method_options(spec_args, spec)
        workflow.seed_everything(0)
        e0 = spec.score(copy.deepcopy(dense), batches, nn.CrossEntropyLoss(), **opts)
        workflow.seed_everything(1)
        e1 = spec.score(copy.deepcopy(dense), batches, nn.CrossEntropyLoss(), **opts)
        assert all(torch.equal(e0[k], e1[k]) for k in e0)


def test_deterministic_flag_sets_torch_state_and_changes_no_cpu_result(dense, tmp_path,
                                                                       monkeypatch):
    torch.set_num_threads(1)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    before = (torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic,
              torch.backends.cudnn.benchmark)
    try:
        args = _args("Kron-OBS", tmp_path, extra=["--deterministic"])
        assert args.deterministic is True
        s1, m1, r1 = _scores_and_pruned(args, dense)
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
        assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
    finally:
        torch.use_deterministic_algorithms(before[0])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = before[1:]
    assert _args("Kron-OBS", tmp_path).deterministic is False
    assert _args("Kron-OBS", tmp_path, extra=["--no-deterministic"]).deterministic is False
    s2, m2, r2 = _scores_and_pruned(_args("Kron-OBS", tmp_path), dense)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    _assert_same_state(m1, m2)
    assert r1 == r2


@pytest.mark.parametrize("script", ["train_prune.py", "iterative_prune.py", "prune_imagenet.py",
                                    "train_imagenet.py", "train_unstructured_prune.py"])
def test_every_script_offers_deterministic(script, capsys):
    import importlib.util
    from helpers import REPO
    spec = importlib.util.spec_from_file_location(f"script_{script[:-3]}", REPO / script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert "--deterministic" in out and "--no-deterministic" in out


# ----------------------------------------------------------------------------- whole script

SCRIPT = ["--num_epochs", "1", "--sl_num_epochs", "1", *TINY, "--ops_ratios", "0.7"]
TIMING = ("seconds_importance", "seconds_pruning", "seconds_finetune")


def _train_prune(method, folder, ckpt):
    proc = run_script("train_prune.py", *SCRIPT, "--importance_type", method,
                      "--output_dir", str(folder), "--save_path_prefix", str(ckpt),
                      env={"OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from utils.checkpoint import load_pruned_model
    rec = json.loads((folder / "ops_0.7" / "results.json").read_text())
    rec = {k: v for k, v in rec.items() if k not in TIMING}
    rec["settings"] = {k: v for k, v in rec["settings"].items()
                       if k not in ("output_dir", "save_path_prefix")}
    return rec, load_pruned_model(folder / "ops_0.7" / "pruned_model.pth")


@pytest.fixture(scope="module")
def first_oba_run(tmp_path_factory):
    """An OBA run that trains its dense network (kept under ckpt/ for the Kron-OBS runs)."""
    root = tmp_path_factory.mktemp("first")
    return root / "ckpt", _train_prune("OBA", root / "out", root / "ckpt")


def _assert_same_run(a, b):
    assert a[0] == b[0]
    assert 0 < a[0]["achieved_ops_ratio"] <= 0.7
    _assert_same_state(a[1], b[1])


def test_train_prune_twice_oba_dense_training_included(first_oba_run, tmp_path):
    """Two whole runs, each training its own dense network: identical records and models."""
    _assert_same_run(first_oba_run[1], _train_prune("OBA", tmp_path / "out", tmp_path / "ckpt"))


def test_train_prune_twice_kron_obs(first_oba_run, tmp_path):
    """Kron-OBS with the sampled true Fisher and its OBS update, twice from one dense network."""
    ckpt = first_oba_run[0]
    _assert_same_run(_train_prune("Kron-OBS", tmp_path / "a", ckpt),
                     _train_prune("Kron-OBS", tmp_path / "b", ckpt))
