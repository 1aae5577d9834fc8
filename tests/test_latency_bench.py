"""bench/latency.py on a tiny grid: dense vs a pruned resnet20 on the CPU (batch 1 and 4, two
repeats); the JSON rows the latency figure reads, MACs of the pruned network below the dense."""
import json

import pytest
import torch
import torch.nn as nn

from bench import latency
from models import get_model
from pruners.driver import PruneSettings, prune_to_target
from utils import cli
from utils.checkpoint import FORMAT, save_atomic, save_pruned_model
from utils.plots import latency_figures

FIELDS = {"variant", "criterion", "target", "seed", "device", "batch_size", "macs", "params",
          "median_ms", "images_per_s"}


def _batches(n):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(4, 3, 32, 32, generator=g), torch.randint(0, 10, (4,), generator=g))
            for _ in range(n)]


def make_grid(tmp_path):
    """A grid folder as the runner writes it: results.json with one finished cell whose
    result_path has pruned_model.pth beside it, one failed cell, and the dense checkpoint the
    cell's run used (<save_path_prefix>/<dataset>_<model>.pth)."""
    torch.manual_seed(0)
    dense = get_model("resnet20", 10)
    prefix = tmp_path / "ckpt"
    save_atomic({"format": FORMAT, "kind": "dense", "arch": "resnet20", "num_classes": 10,
                 "dataset": "cifar10", "state_dict": dense.state_dict()},
                prefix / "cifar10_resnet20.pth")
    model = get_model("resnet20", 10)
    model.load_state_dict(dense.state_dict())
    settings = PruneSettings(target_ops_ratio=0.5, iterative_steps=2, iters_per_step=1)
    prune_to_target(model, "Weight", _batches, nn.CrossEntropyLoss(), torch.randn(2, 3, 32, 32),
                    settings, [model.linear if hasattr(model, "linear") else model.fc],
                    progress=False)
    cell_dir = tmp_path / "grid" / "Weight_0.5_s0"
    record = {"dataset": "cifar10", "model": "resnet20", "importance_type": "Weight",
              "target_ops_ratio": 0.5, "seed": 0,
              "settings": {"save_path_prefix": str(prefix), "dataset": "cifar10",
                           "model": "resnet20", "pretrained": None, "sparsity_l1": 0.0}}
    save_pruned_model(model, cell_dir / "pruned_model.pth", arch="resnet20", num_classes=10,
                      model_kwargs={}, results=record)
    (cell_dir / "results.json").write_text(json.dumps(record))
    cells = [{"model": "resnet20", "dataset": "cifar10", "mode": "oneshot", "criterion": "Weight",
              "target": 0.5, "seed": 0, "status": "done", "error": None,
              "result_path": str(cell_dir / "results.json")},
             {"model": "resnet20", "dataset": "cifar10", "mode": "oneshot", "criterion": "OBA",
              "target": 0.5, "seed": 0, "status": "failed", "error": "RuntimeError: x",
              "result_path": None}]
    (tmp_path / "grid" / "results.json").write_text(json.dumps(cells))
    return tmp_path / "grid", cell_dir / "pruned_model.pth"


def test_grid_latency_rows(tmp_path, capsys):
    grid, pruned = make_grid(tmp_path)
    out = tmp_path / "lat.json"
    assert latency.main(["--grid", str(grid), "--devices", "cpu", "--batch_sizes", "1", "4",
                         "--repeats", "2", "--warmup", "1", "--threads", "1", "--json", str(out),
                         "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "random weights" not in printed  # the dense checkpoint of the cell's run was found
    assert "failed cell OBA" in printed
    assert "| variant | device | batch | MACs | params | median ms | images/s | speed-up |" in printed
    rows = json.loads(out.read_text())
    assert [(r["variant"], r["batch_size"]) for r in rows] == [
        ("dense", 1), ("dense", 4), ("Weight 0.5 s0", 1), ("Weight 0.5 s0", 4)]
    for r in rows:
        assert FIELDS <= r.keys()
        assert r["device"] == "cpu" and r["median_ms"] > 0
        assert abs(r["images_per_s"] - 1000.0 * r["batch_size"] / r["median_ms"]) < 1e-6
    dense, pruned_rows = rows[0], rows[2:]
    assert dense["criterion"] is None and dense["target"] is None
    assert pruned_rows[0]["criterion"] == "Weight" and pruned_rows[0]["target"] == 0.5
    assert pruned_rows[0]["seed"] == 0
    assert all(r["macs"] < dense["macs"] and r["params"] < dense["params"] for r in pruned_rows)
    assert 0.3 < pruned_rows[0]["macs"] / dense["macs"] <= 0.5
    assert dense["macs"] == rows[1]["macs"]  # MACs per image, whatever the batch
    # The rows draw the latency figure: one panel per batch size.
    fig = latency_figures(rows)["latency_cpu"]
    assert len(fig.axes) == 2
    # --seeds keeps only those seeds' cells (the dense row is always timed).
    quick = ["--grid", str(grid), "--devices", "cpu", "--batch_sizes", "1", "--repeats", "1",
             "--warmup", "0", "--json", str(out), "--no-progress", "--seeds"]
    assert latency.main(quick + ["0"]) == 0
    assert [r["variant"] for r in json.loads(out.read_text())] == ["dense", "Weight 0.5 s0"]
    with pytest.raises(cli.UsageError, match="no pruned model"):
        latency.main(quick + ["1"])


def test_models_and_dense_by_name(tmp_path, capsys):
    _, pruned = make_grid(tmp_path)
    out = tmp_path / "lat.json"
    assert latency.main(["--models", str(pruned), "--dense", "resnet20", "--devices", "cpu",
                         "cuda", "--batch_sizes", "1", "--repeats", "1", "--warmup", "0",
                         "--json", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "random weights" in printed
    if not torch.cuda.is_available():
        assert "cuda skipped" in printed
    rows = [r for r in json.loads(out.read_text()) if r["device"] == "cpu"]
    assert [r["variant"] for r in rows] == ["dense", "Weight 0.5 s0"]
    assert rows[1]["macs"] < rows[0]["macs"]
    assert rows[1]["speedup"] == rows[0]["median_ms"] / rows[1]["median_ms"]
