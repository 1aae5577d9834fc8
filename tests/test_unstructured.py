"""Unstructured and N:M sparsity: exact global counts, N:M groups, masks through fine-tuning, score
reset between steps, folded / exported models, and the script end to end on digits."""
import copy
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, TensorDataset

from models import get_classifier, get_model
from pruners import unstructured as us
from pruners.registry import Method
from utils.data import BatchStream

from helpers import assert_one_line_error
from test_scripts import run

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
import train_unstructured_prune as script  # noqa: E402

SCRIPT = "train_unstructured_prune.py"
FAST = ["--model", "resnet8", "--num_epochs", "1", "--sl_num_epochs", "1", "--batch_size", "128",
        "--iterative_steps", "2", "--iters_per_step", "1", "--bn_recalibration_batches", "2",
        "--no-progress", "--no-tensorboard"]


def random_scores(targets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.rand(t.tensor.shape, generator=gen) for n, t in targets.items()}


all_kept = us.all_kept


# ----------------------------------------------------------------------------- selection

@pytest.mark.parametrize("arch", ["resnet8", "vgg11"])
@pytest.mark.parametrize("density", [0.5, 0.2, 0.1, 0.05, 0.0123])
def test_global_density_within_one_weight(arch, density):
    model = get_model(arch, 10)
    layers = us.prunable_weights(model, get_classifier(model))
    masks = us.global_masks(random_scores(layers), all_kept(layers), density)
    report = us.density_report(masks)
    assert abs(report["kept"] - density * report["total"]) <= 1
    for n, m in masks.items():  # the per-layer floor (max_layer_sparsity 0.99)
        assert int(m.sum()) >= math.ceil(0.01 * m.numel())


def test_global_threshold_against_sort_and_ties():
    # Two layers, distinct scores: the kept set is exactly the top-k of the concatenation.
    scores = {"a": torch.tensor([0.9, 0.1, 0.5, 0.3]), "b": torch.tensor([0.8, 0.2, 0.7, 0.05])}
    masks = {n: torch.ones(4, dtype=torch.bool) for n in scores}
    kept = us.global_masks(scores, masks, 3 / 8, max_layer_sparsity=0.0 + 0.99)
    assert kept["a"].tolist() == [True, False, False, False]
    assert kept["b"].tolist() == [True, False, True, False]
    # All scores equal: ties go to the earlier layer, then the earlier position.
    flat = {n: torch.ones(4) for n in scores}
    kept = us.global_masks(flat, masks, 5 / 8, max_layer_sparsity=0.5)
    assert kept["a"].tolist() == [True, True, True, False]  # floor of b: 2 weights
    assert kept["b"].tolist() == [True, True, False, False]
    # Removed weights never come back, whatever their new score.
    old = {"a": torch.tensor([False, True, True, True]), "b": torch.ones(4, dtype=torch.bool)}
    big = {"a": torch.tensor([100.0, 0.1, 0.2, 0.3]), "b": torch.full((4,), 0.01)}
    kept = us.global_masks(big, old, 4 / 8, max_layer_sparsity=0.99)
    assert not kept["a"][0] and int(kept["a"].sum() + kept["b"].sum()) == 4


def test_layer_floor_forces_the_best_of_a_starved_layer():
    scores = {"big": torch.ones(100), "small": torch.arange(100.0) * 1e-6}
    masks = {n: torch.ones(100, dtype=torch.bool) for n in scores}
    kept = us.global_masks(scores, masks, 0.1, max_layer_sparsity=0.95)
    assert int(kept["small"].sum()) == 5 and kept["small"][-5:].all()  # the 5 best of it
    assert int(kept["big"].sum()) == 15  # the total stays exact: 20 of 200
    with pytest.raises(us.SparsityError, match="max_layer_sparsity"):
        us.global_masks(scores, masks, 0.05, max_layer_sparsity=0.9)


def brute_force_nm(score, mask, n, m):
    """Per group, in plain Python: keep the n highest (earliest on ties) of those still kept."""
    out = torch.zeros_like(mask)
    w = score.movedim(1, -1)
    mk = mask.movedim(1, -1)
    o = out.movedim(1, -1)
    flat_s, flat_m, flat_o = w.reshape(-1, w.shape[-1]), mk.reshape(-1, w.shape[-1]), o.reshape(-1, w.shape[-1])
    for r in range(flat_s.shape[0]):
        for g in range(0, flat_s.shape[1], m):
            cand = [j for j in range(g, g + m) if flat_m[r, j]]
            cand.sort(key=lambda j: (-float(flat_s[r, j]), j))
            for j in cand[:n]:
                flat_o[r, j] = True
    return flat_o.reshape(o.shape).movedim(-1, 1)


@pytest.mark.parametrize("n,m", [(2, 4), (4, 8), (1, 4)])
def test_nm_groups_keep_exactly_n(n, m):
    gen = torch.Generator().manual_seed(1)
    shapes = {"conv": (6, 16, 3, 3), "linear": (5, 24), "odd": (4, 3, 3, 3)}
    scores = {k: torch.rand(s, generator=gen).round(decimals=1) for k, s in shapes.items()}  # ties
    masks = {k: torch.ones(s, dtype=torch.bool) for k, s in shapes.items()}
    kept = us.nm_masks(scores, masks, n, m)
    assert kept["odd"].all()  # input dimension 3 is not a multiple of m: left dense
    for k in ("conv", "linear"):
        assert us.check_nm(kept[k], n, m)
        assert torch.equal(kept[k], brute_force_nm(scores[k], masks[k], n, m))
    # A second, tighter step keeps a subset (monotone) and still exactly n' per group.
    if n > 1:
        again = us.nm_masks({k: torch.rand(s, generator=gen) for k, s in shapes.items()}, kept, n - 1, m)
        for k in ("conv", "linear"):
            assert us.check_nm(again[k], n - 1, m) and not (again[k] & ~kept[k]).any()


def test_schedules():
    d = us.density_schedule(0.1, 4)
    assert len(d) == 4 and d[-1] == pytest.approx(0.1) and all(a > b for a, b in zip(d, d[1:]))
    assert us.nm_schedule(2, 4, 16) == [3, 2]
    assert us.nm_schedule(2, 8, 3)[-1] == 2


@pytest.mark.parametrize("text", ["2-4", "4:4", "5:4", "0:4", "a:b", "2:4:8"])
def test_bad_patterns(text):
    with pytest.raises(us.SparsityError):
        us.parse_pattern(text)


# ----------------------------------------------------------------------------- masks on a model

def tiny_loaders(n=64, classes=10, seed=0):
    gen = torch.Generator().manual_seed(seed)
    data = TensorDataset(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, classes, (n,), generator=gen))
    loader = DataLoader(data, batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(seed))
    return SimpleNamespace(train=loader, val=DataLoader(data, batch_size=32), test=DataLoader(data, batch_size=32),
                           num_classes=classes)


def test_masked_weights_stay_zero_through_training_and_classifier_untouched():
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    fc = get_classifier(model)
    fc_before = fc.weight.detach().clone()
    layers = us.prunable_weights(model, fc)
    assert "fc.weight" not in layers and all(isinstance(t.module, (nn.Conv2d, nn.Linear)) and t.attr == "weight"
                                             for t in layers.values())
    masks = us.global_masks(random_scores(layers), all_kept(layers), 0.2)
    us.zero_pruned(layers, masks)
    assert torch.equal(fc.weight, fc_before)
    us.apply_masks(layers, masks)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    for x, y in tiny_loaders().train:
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
        for n, t in layers.items():
            assert (t.tensor[~masks[n]] == 0).all()
    us.remove_masks(layers)
    for n, t in layers.items():
        assert isinstance(t.tensor, nn.Parameter) and not hasattr(t.module, "weight_mask")
        assert (t.tensor[~masks[n]] == 0).all() and (t.tensor[masks[n]] != 0).any()
    # the folded state dict loads into a fresh dense network and computes the same function
    fresh = get_model("resnet8", 10)
    fresh.load_state_dict(model.state_dict())
    x = torch.randn(4, 3, 32, 32)
    model.eval(), fresh.eval()
    assert torch.equal(model(x), fresh(x))


def test_vit_attention_projections_masked_through_training():
    # nn.MultiheadAttention reads out_proj.weight without calling out_proj: the mask must still hold.
    from test_vit_pruning import tiny_vit
    model = tiny_vit()
    targets = us.prunable_weights(model, get_classifier(model))
    names = set(targets)
    assert "encoder.layers.encoder_layer_0.self_attention.in_proj_weight" in names
    assert "encoder.layers.encoder_layer_0.self_attention.out_proj.weight" in names
    assert "encoder.layers.encoder_layer_0.mlp.0.weight" in names and "heads.head.weight" not in names
    masks = us.nm_masks(random_scores(targets), us.all_kept(targets), 2, 4)
    us.zero_pruned(targets, masks)
    reference = copy.deepcopy(model)
    us.apply_masks(targets, masks)
    x = torch.randn(4, 3, 32, 32)
    model.eval(), reference.eval()
    assert torch.allclose(model(x), reference(x), atol=1e-6)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(4)).backward()
        opt.step()
    model.eval()
    out = model(x)
    us.remove_masks(targets)
    for n, t in targets.items():
        assert (t.tensor[~masks[n]] == 0).all(), n
        assert us.check_nm(masks[n], 2, 4) if n != "conv_proj.weight" else masks[n].all()  # RGB input
    assert torch.allclose(model(x), out, atol=1e-6)  # what was trained is what was folded
    fresh = tiny_vit(seed=1).eval()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), model(x))


def test_sparse_export_round_trip(tmp_path):
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    layers = us.prunable_weights(model, get_classifier(model))
    masks = us.nm_masks(random_scores(layers), all_kept(layers), 2, 4)
    us.zero_pruned(layers, masks)
    state = model.state_dict()
    keyed = masks
    size = us.export_sparse(state, keyed, tmp_path / "m.npz", meta={"pattern": "2:4"})
    assert size == (tmp_path / "m.npz").stat().st_size
    back, back_masks, meta = us.import_sparse(tmp_path / "m.npz")
    assert meta == {"pattern": "2:4"} and set(back) == set(state)
    for k, v in state.items():
        assert back[k].dtype == v.dtype and torch.equal(back[k], v), k
    for k, mk in keyed.items():
        assert torch.equal(back_masks[k], mk)
        if us.nm_compatible(mk.shape, 4):
            assert us.check_nm(back_masks[k], 2, 4)
    dense = sum(v.numel() * v.element_size() for v in state.values())
    assert size < 0.75 * dense


# ----------------------------------------------------------------------------- the schedule

_CALLS = []


def _stepwise_scores(model, batches, loss_fn):
    # Step 1 prefers weights 1 then 0; step 2 prefers 0 among those left (and 2, 3, removed).
    # Accumulating step 1 into step 2 would keep weight 1 instead.
    table = [[3.0, 5.0, 1.0, 0.0], [2.0, 1.0, 9.0, 9.0]]
    _CALLS.append(model[0].weight.detach().clone())
    return {"0.weight": torch.tensor([table[len(_CALLS) - 1]]), "0.bias": torch.zeros(1)}


def test_scores_start_from_zero_every_step(tmp_path, monkeypatch):
    from pruners import registry
    registry.available_methods()  # load the real table first; the stub lives for this test only
    monkeypatch.setitem(registry._METHODS, "_StepwiseTest",
                        Method("_StepwiseTest", _stepwise_scores, needs_data=False))
    _CALLS.clear()
    model = nn.Sequential(nn.Linear(4, 1))
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[1.0, 2.0, 3.0, 4.0]]))
    layers = {"0.weight": us.Target(model[0])}
    args = SimpleNamespace(importance_type="_StepwiseTest", iterative_steps=2, iters_per_step=1,
                           normalizer="max", max_layer_sparsity=0.99, bn_recalibration_batches=0,
                           ft_between_steps=0, seed=0, score_mode="train")
    data = TensorDataset(torch.randn(8, 4), torch.zeros(8, dtype=torch.long))
    loaders = SimpleNamespace(train=DataLoader(data, batch_size=4), test=DataLoader(data, batch_size=4))
    ctx = SimpleNamespace(args=args, loaders=loaders, device=torch.device("cpu"), out_dir=tmp_path,
                          batches=BatchStream(data, 4, seed=0), progress=False)
    masks, info = script.sparsify(ctx, model, layers, None, 0.25)
    assert masks["0.weight"].tolist() == [[True, False, False, False]]
    # step 2 was scored on the masked network (step 1 removed weights 2 and 3)
    assert _CALLS[1].tolist() == [[1.0, 2.0, 0.0, 0.0]]
    assert model[0].weight.tolist() == [[1.0, 0.0, 0.0, 0.0]]
    assert [s["density"] for s in info["steps"]] == [0.5, 0.25]


def test_weight_scores_are_zero_where_removed():
    torch.manual_seed(0)
    model = get_model("resnet8", 10)
    layers = us.prunable_weights(model, get_classifier(model))
    masks = us.global_masks(random_scores(layers), all_kept(layers), 0.3)
    us.zero_pruned(layers, masks)
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    scores = us.weight_scores("Taylor", model, layers, masks, [(x, y)])
    for n in layers:
        assert (scores[n][~masks[n]] == 0).all() and scores[n].max() == pytest.approx(1.0)


# ----------------------------------------------------------------------------- the script

@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tmp_path_factory.mktemp("ckpt")


def test_end_to_end_unstructured(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = run(SCRIPT, *FAST, "--importance_type", "OBA", "--pruning_ratio", "0.1",
               "--output_dir", str(out), "--save_path_prefix", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert abs(rec["kept_weights"] - 0.1 * rec["prunable_weights"]) <= 1
    assert "fc.weight" not in rec["layer_density"] and rec["masked_weights_zero"]
    assert len(rec["steps"]) == 2 and all("test_acc" in s for s in rec["steps"])
    for key in ("test_acc_dense", "test_acc_pruned", "test_acc_finetuned", "seconds", "export"):
        assert key in rec
    assert rec["export"]["export_roundtrip"] and rec["export"]["sparse_export_bytes"] < rec["export"]["dense_bytes"]
    saved = torch.load(out / "sparse_model.pth", map_location="cpu", weights_only=False)
    model = get_model("resnet8", 10)
    model.load_state_dict(saved["state_dict"])
    state = model.state_dict()
    kept = sum(int((state[n] != 0).sum()) for n in rec["layer_density"])
    assert kept <= rec["kept_weights"]
    back, _, _ = us.import_sparse(out / "sparse_model.npz")
    other = get_model("resnet8", 10)
    other.load_state_dict(back)
    x = torch.randn(3, 3, 32, 32)
    model.eval(), other.eval()
    assert torch.equal(model(x), other(x))
    # an interrupted fine-tune continues from pruned_init.pth + finetune.train.pth: no re-pruning
    first = (out / "results.json").read_text()
    (out / "results.json").unlink()
    again = run(SCRIPT, *FAST, "--importance_type", "OBA", "--pruning_ratio", "0.1", "--resume",
                "--output_dir", str(out), "--save_path_prefix", str(ckpt))
    assert again.returncode == 0 and "step 1/" not in again.stdout, again.stderr[-2000:]
    redo = json.loads((out / "results.json").read_text())
    for key in ("layer_kept", "test_acc_pruned", "test_acc_finetuned", "steps"):
        assert redo[key] == json.loads(first)[key], key
    # a finished run is skipped under --resume
    again = run(SCRIPT, *FAST, "--importance_type", "OBA", "--pruning_ratio", "0.1", "--resume",
                "--output_dir", str(out), "--save_path_prefix", str(ckpt))
    assert again.returncode == 0 and "finished" in again.stdout


def test_end_to_end_two_of_four(ckpt, tmp_path):
    out = tmp_path / "out"
    proc = run(SCRIPT, *FAST, "--importance_type", "Weight", "--pattern", "2:4", "--sl_num_epochs", "0",
               "--output_dir", str(out), "--save_path_prefix", str(ckpt))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "results.json").read_text())
    assert rec["left_dense"] == ["conv1.weight"] and "conv1.weight" in proc.stdout
    assert rec["export"]["pattern_verified_on_reload"]
    for n, d in rec["layer_density"].items():
        assert d == (1.0 if n == "conv1.weight" else 0.5)


@pytest.mark.parametrize("bad, words", [
    (["--pruning_ratio", "0"], ["--pruning_ratio"]),
    (["--pruning_ratio", "1.5"], ["--pruning_ratio"]),
    (["--pattern", "2-4"], ["--pattern"]),
    (["--pattern", "4:4"], ["N < M"]),
    (["--pattern", "2:4", "--pruning_ratio", "0.3"], ["conflicts"]),
    (["--importance_type", "Eigen"], ["per-weight"]),
])
def test_bad_input_one_line_nothing_written(tmp_path, bad, words):
    out, ck = tmp_path / "out", tmp_path / "ckpt"
    proc = run(SCRIPT, *FAST, *bad, "--output_dir", str(out), "--save_path_prefix", str(ck))
    assert_one_line_error(proc, *words)
    assert not out.exists() and not ck.exists()


def test_semi_structured_misfit_names_what_the_2_4_kernels_cannot_take():
    """The dtype, tile and pattern checks that keep `to_semi_structured` from failing halfway
    (torch's default cuSPARSELt limits: fp16/bf16/int8/fp8, fp16 in multiples of 16 × 16)."""
    w = torch.randn(32, 64)
    w.view(-1, 4)[:, :2] = 0  # 2:4 along the input dimension
    assert us.semi_structured_misfit(w.half()) is None
    assert "dtype torch.float32" in us.semi_structured_misfit(w)
    assert "20 × 64" in us.semi_structured_misfit(w[:20].half())
    assert "not 2:4" in us.semi_structured_misfit(torch.randn(32, 64).half())
    linear = torch.nn.Linear(64, 32)
    with torch.no_grad():
        linear.weight.copy_(w)
    assert us.to_semi_structured(torch.nn.Sequential(linear)) == []  # CPU: nothing converted
    assert type(linear.weight) is torch.nn.Parameter
