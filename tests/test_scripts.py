"""End-to-end runs of the scripts on the embedded digits data, and their bad-input behaviour:
one line on stderr, non-zero exit, no traceback, nothing on disk damaged."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import assert_one_line_error, run_script

REPO = Path(__file__).resolve().parent.parent
FAST = ["--num_epochs", "1", "--sl_num_epochs", "1", "--batch_size", "128", "--iterative_steps", "2",
        "--iters_per_step", "1", "--no-progress", "--no-tensorboard", "--model", "resnet8"]


def run(script, *args, cwd=None):
    return run_script(script, *args, cwd=cwd, timeout=600)


@pytest.fixture(scope="module")
def dense_dir(tmp_path_factory):
    """A dense digits checkpoint trained once for the module."""
    d = tmp_path_factory.mktemp("dense")
    proc = run("train_prune.py", *FAST, "--importance_type", "Weight", "--ops_ratios", "0.7",
               "--output_dir", str(d / "out"), "--save_path_prefix", str(d / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return d


def test_one_shot_end_to_end(dense_dir, tmp_path):
    out = tmp_path / "out"
    proc = run("train_prune.py", *FAST, "--importance_type", "OBA", "--ops_ratios", "0.7", "0.5",
               "--output_dir", str(out), "--save_path_prefix", str(dense_dir / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for r in (0.7, 0.5):
        rec = json.loads((out / f"ops_{r:g}" / "results.json").read_text())
        for key in ("dataset", "model", "importance_type", "target_ops_ratio", "achieved_ops_ratio",
                    "achieved_params_ratio", "dense_macs", "pruned_macs", "dense_params",
                    "pruned_params", "test_acc_dense", "test_acc_pruned", "test_acc_finetuned",
                    "seconds_importance", "seconds_pruning", "seconds_finetune"):
            assert key in rec, key
        assert rec["achieved_ops_ratio"] <= r
        assert rec["pruned_macs"] < rec["dense_macs"]
        # one-shot: every target starts from the dense network
        assert rec["test_acc_dense"] == json.loads(
            (out / "ops_0.7" / "results.json").read_text())["test_acc_dense"]
    assert "MACs" in proc.stdout and "test acc dense" in proc.stdout
    assert "importance estimation" in proc.stdout
    # the documented one-call loader gives back a working network of the recorded size
    code = ("import sys, torch; sys.path.insert(0, %r);"
            "from utils.checkpoint import load_pruned_model; from utils.flops import count_macs;"
            "m = load_pruned_model(%r); print(count_macs(m, torch.zeros(1, 3, 32, 32)))"
            % (str(REPO), str(out / "ops_0.5" / "pruned_model.pth")))
    macs = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    rec = json.loads((out / "ops_0.5" / "results.json").read_text())
    assert int(macs.stdout.strip()) == rec["pruned_macs"]


def test_iterative_end_to_end(dense_dir, tmp_path):
    out = tmp_path / "iter"
    proc = run("iterative_prune.py", *FAST, "--importance_type", "Weight", "--ops_ratios", "0.8", "0.6",
               "--output_dir", str(out), "--save_path_prefix", str(dense_dir / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = json.loads((out / "summary.json").read_text())
    assert [r["target_ops_ratio"] for r in recs] == [0.8, 0.6]
    assert recs[0]["achieved_ops_ratio"] <= 0.8 and recs[1]["achieved_ops_ratio"] <= 0.6
    assert recs[1]["dense_macs"] == recs[0]["dense_macs"]  # ratios stay relative to the dense net


@pytest.mark.parametrize("args,words", [
    (["--model", "resnet7x"], ["unknown model", "resnet20"]),
    (["--dataset", "mnist"], ["mnist", "cifar10"]),
    (["--importance_type", "Magic"], ["unknown importance type", "OBA"]),
    (["--ops_ratios", "0"], ["out of range"]),
    (["--ops_ratios", "1.5"], ["out of range"]),
    (["--dataset", "cifar10", "--data_root", "/nonexistent/cifar"], ["/nonexistent/cifar", "--download"]),
])
def test_bad_input_one_line(args, words, tmp_path):
    proc = run("train_prune.py", *FAST, "--output_dir", str(tmp_path / "o"),
               "--save_path_prefix", str(tmp_path / "c"), *args)
    assert_one_line_error(proc, *words)


def test_iterative_ratios_must_decrease(tmp_path):
    proc = run("iterative_prune.py", *FAST, "--ops_ratios", "0.5", "0.6",
               "--output_dir", str(tmp_path / "o"), "--save_path_prefix", str(tmp_path / "c"))
    assert_one_line_error(proc, "decreasing")


def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = run("train_prune.py", *FAST, "--output_dir", str(blocker / "sub"),
               "--save_path_prefix", str(tmp_path / "c"))
    assert_one_line_error(proc, "not writable", "--output_dir")
    assert blocker.read_text() == "not a folder"


def test_truncated_and_foreign_checkpoints(dense_dir, tmp_path):
    good = dense_dir / "ckpt" / "digits_resnet8.pth"
    data = good.read_bytes()
    bad = tmp_path / "truncated.pth"
    bad.write_bytes(data[: len(data) // 3])
    proc = run("train_prune.py", *FAST, "--pretrained", str(bad), "--output_dir", str(tmp_path / "o"),
               "--save_path_prefix", str(tmp_path / "c"))
    assert_one_line_error(proc, "truncated.pth")
    assert bad.read_bytes() == data[: len(data) // 3]
    proc = run("train_prune.py", *FAST[:-2], "--model", "vgg11", "--pretrained", str(good),
               "--output_dir", str(tmp_path / "o"), "--save_path_prefix", str(tmp_path / "c"))
    assert_one_line_error(proc, "resnet8")
    assert good.read_bytes() == data


@pytest.mark.parametrize("method,extra", [
    ("Eigen", []), ("Slim", ["--sparsity_l1", "1e-4"]),
    # the criteria themselves are covered by their unit tests; these runs only add plumbing
    pytest.param("Kron-OBS", [], marks=pytest.mark.slow),
    pytest.param("fastOBA", ["--order", "2"], marks=pytest.mark.slow)])
def test_other_criteria_end_to_end(method, extra, dense_dir, tmp_path):
    out = tmp_path / method
    proc = run("train_prune.py", *FAST, "--importance_type", method, *extra, "--ops_ratios", "0.6",
               "--output_dir", str(out), "--save_path_prefix", str(dense_dir / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads((out / "ops_0.6" / "results.json").read_text())
    assert rec["importance_type"] == method and rec["achieved_ops_ratio"] <= 0.6
    if method == "Slim":  # trained with the L1 penalty: its own dense checkpoint
        assert (dense_dir / "ckpt" / "digits_resnet8_l1-0.0001.pth").exists()


def test_same_seed_same_masks_and_metrics(dense_dir, tmp_path):
    import torch

    from utils.checkpoint import load_pruned_model
    recs, models = [], []
    for name in ("a", "b"):
        out = tmp_path / name
        proc = run("train_prune.py", *FAST, "--sl_num_epochs", "0", "--importance_type", "Taylor", "--ops_ratios", "0.6",
                   "--output_dir", str(out), "--save_path_prefix", str(dense_dir / "ckpt"))
        assert proc.returncode == 0, proc.stderr[-3000:]
        recs.append(json.loads((out / "ops_0.6" / "results.json").read_text()))
        models.append(load_pruned_model(out / "ops_0.6" / "pruned_model.pth"))
    for key in ("pruned_macs", "pruned_params", "test_acc_pruned", "test_acc_finetuned"):
        assert recs[0][key] == recs[1][key], key
    for (k, a), b in zip(models[0].state_dict().items(), models[1].state_dict().values()):
        assert torch.equal(a, b), k


def test_summary_records_finished_and_failed_targets(dense_dir, tmp_path):
    out = tmp_path / "out"
    proc = run("train_prune.py", *FAST, "--importance_type", "Weight", "--ops_ratios", "0.7",
               "0.01", "--max_pruning_ratio", "0.5", "--sl_num_epochs", "0",
               "--output_dir", str(out), "--save_path_prefix", str(dense_dir / "ckpt"))
    assert_one_line_error(proc, "cannot be reached")
    summary = json.loads((out / "summary.json").read_text())
    assert summary[0]["target_ops_ratio"] == 0.7 and summary[0]["achieved_ops_ratio"] <= 0.7
    assert summary[1]["target_ops_ratio"] == 0.01 and summary[1]["status"] == "failed"
    assert "cannot be reached" in summary[1]["error"]


def test_pretrained_weights_are_pruned_not_retrained(dense_dir, tmp_path):
    # --weights means "prune these": even with the default --num_epochs no training starts
    import torch
    from models import get_model
    weights = tmp_path / "w.pth"
    torch.save(get_model("resnet8", 10).state_dict(), weights)
    fast = list(FAST)
    del fast[fast.index("--num_epochs"):fast.index("--num_epochs") + 2]  # the default: 200
    proc = run("train_prune.py", *fast,
               "--importance_type", "Weight", "--ops_ratios", "0.7", "--sl_num_epochs", "0",
               "--weights", str(weights), "--output_dir", str(tmp_path / "out"),
               "--save_path_prefix", str(tmp_path / "ckpt"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dense training" not in proc.stderr
    assert not (tmp_path / "ckpt" / "digits_resnet8.train.pth").exists()
