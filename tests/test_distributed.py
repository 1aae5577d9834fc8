"""torchrun on CPU (gloo): importance scores shared out over processes equal those of one process
over the same batches, every process ends with the same scores and the same pruned network, and
prune_imagenet.py runs under torchrun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import distributed_worker
from utils.distributed import check_same_model, shard_indices

REPO = Path(__file__).resolve().parent.parent


def torchrun(*args, nproc=2, timeout=600):
    # OMP_NUM_THREADS=1 in both runs: the same kernels, so only the summation order differs.
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", str(nproc), *map(str, args)],
                          capture_output=True, text=True, env=env, timeout=timeout, cwd=REPO)


def test_shards_cover_every_batch_once():
    assert shard_indices(7, 0, 2) == [0, 2, 4, 6] and shard_indices(7, 1, 2) == [1, 3, 5]
    assert sorted(shard_indices(10, 0, 3) + shard_indices(10, 1, 3) + shard_indices(10, 2, 3)) \
        == list(range(10))


def test_two_processes_give_the_scores_of_one(tmp_path):
    proc = torchrun(REPO / "tests" / "distributed_worker.py", tmp_path / "scores.pt")
    assert proc.returncode == 0, proc.stderr[-3000:]
    ranks = torch.load(tmp_path / "scores.pt", weights_only=False)
    single = distributed_worker.compute()
    assert len(ranks) == 2
    for name in list(distributed_worker.CRITERIA) + ["batchnorm"]:
        for rank_scores in ranks:
            assert rank_scores[name].keys() == single[name].keys(), name
            for key, value in single[name].items():
                # float64, same batches: the only difference is the order in which the
                # per-process sums are added (rank sums, then the all-reduce)
                torch.testing.assert_close(rank_scores[name][key], value, rtol=1e-10, atol=1e-14,
                                           msg=f"{name} {key}")
        # the ranks hold bit-identical scores (they all receive the same all-reduced sums)
        for key in single[name]:
            assert torch.equal(ranks[0][name][key], ranks[1][name][key])


def test_check_same_model_is_free_in_one_process():
    net = distributed_worker.network()
    check_same_model(net, "a step")  # no process group: nothing to compare, no error


def _prune(out, nproc, weights, data, *extra):
    args = ["prune_imagenet.py", "--model", "resnet18", "--weights", weights, "--data_root", data,
            "--image_size", "32", "--ops_ratios", "0.6", "--iterative_steps", "2",
            "--iters_per_step", "2", "--batch_size", "6", "--device", "cpu", "--no-progress",
            "--save_dir", out, "--importance_type", "Taylor", *extra]
    if nproc == 1:
        env = dict(os.environ, OMP_NUM_THREADS="1")
        return subprocess.run([sys.executable, *map(str, args)], capture_output=True, text=True,
                              env=env, cwd=REPO, timeout=600)
    return torchrun(*args, nproc=nproc)


@pytest.fixture(scope="module")
def resnet18_weights(tmp_path_factory):
    from models import get_model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(get_model("resnet18", 3).state_dict(), path)
    return path


def test_prune_imagenet_under_torchrun_matches_one_process(tmp_path, resnet18_weights,
                                                           imagenet_folder):
    # BatchNorm re-estimation off: one process averages batch moments incrementally, two
    # processes average them in float64 at the end; the last bits differ, and on a random
    # network a near-tie between two channels may then break the other way.
    extra = ("--bn_recalibration_batches", "0")
    one = _prune(tmp_path / "one", 1, resnet18_weights, imagenet_folder, *extra)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _prune(tmp_path / "two", 2, resnet18_weights, imagenet_folder, *extra)
    assert two.returncode == 0, two.stderr[-3000:]
    from utils.checkpoint import load_pruned_model
    a = load_pruned_model(tmp_path / "one" / "pruned_model.pth")
    b = load_pruned_model(tmp_path / "two" / "pruned_model.pth")
    assert {k: v.shape for k, v in a.state_dict().items()} == \
        {k: v.shape for k, v in b.state_dict().items()}
    rec_one = json.loads((tmp_path / "one" / "pruned_model.json").read_text())
    rec_two = json.loads((tmp_path / "two" / "pruned_model.json").read_text())
    assert rec_two["world_size"] == 2 and rec_one["world_size"] == 1
    assert rec_one["pruned_macs"] == rec_two["pruned_macs"]
    assert rec_one["test_acc_dense"] == rec_two["test_acc_dense"]  # exact all-reduced metrics
    # only rank 0 wrote: one model file, one record, one summary
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == \
        ["pruned_model.json", "pruned_model.pth", "pruned_model_summary.json"]


def test_more_processes_than_batches_is_one_line(tmp_path, resnet18_weights, imagenet_folder):
    proc = _prune(tmp_path / "x", 2, resnet18_weights, imagenet_folder, "--iters_per_step", "1")
    assert proc.returncode != 0
    assert "only --iters_per_step 1 batches" in proc.stderr
    assert not (tmp_path / "x" / "pruned_model.pth").exists()


def test_one_process_scripts_refuse_torchrun(tmp_path):
    env = dict(os.environ, WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
    proc = subprocess.run([sys.executable, str(REPO / "train_prune.py"), "--output_dir",
                           str(tmp_path / "o"), "--save_path_prefix", str(tmp_path / "c")],
                          capture_output=True, text=True, env=env, cwd=REPO, timeout=300)
    assert proc.returncode == 2 and "runs in one process" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "o").exists()


def test_unwritable_save_dir_fails_on_every_process_alike(tmp_path, resnet18_weights,
                                                          imagenet_folder):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    proc = _prune(blocker / "out", 2, resnet18_weights, imagenet_folder)
    assert proc.returncode != 0
    # both processes stop at the same check with the same line; neither dies in a collective
    assert proc.stderr.count("is not writable") == 2, proc.stderr[-3000:]
    assert "Connection closed" not in proc.stderr and 'prune_imagenet.py", line' not in proc.stderr
