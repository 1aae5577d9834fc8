"""bench/importance_cost.py: the CPU peak-memory probe and one tiny end-to-end run."""
import json
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "bench"))
import importance_cost  # noqa: E402


def test_live_tensor_peak_counts_storages_and_frees():
    def work():
        a = torch.zeros(1000, dtype=torch.float64)        # 8 000 bytes
        view = a[10:]                                     # same storage: not counted again
        del a, view
        b = torch.zeros(500, dtype=torch.float64)         # 4 000 bytes, after a was freed
        c = torch.ones(250, dtype=torch.float64) + b[:250]  # 2 000 bytes (+ the ones, freed)
        return c

    assert importance_cost.measure_peak(work, "cpu") == 8000
    kept = []
    assert importance_cost.measure_peak(lambda: kept.append(torch.zeros(3000)), "cpu") == 12000


@pytest.mark.slow
def test_bench_runs_every_criterion(tmp_path):
    out = tmp_path / "rows.json"
    importance_cost.main(["--models", "resnet20", "--batch_size", "2", "--repeats", "1",
                          "--json", str(out)])
    rows = json.loads(out.read_text())
    assert [r["method"] for r in rows] == ["train"] + list(importance_cost.METHODS)
    kfac = {r["method"]: r for r in rows if r["method"] in importance_cost.KFAC_METHODS}
    assert all(r["step_s"] is not None and r["peak_bytes"] > 0 for r in kfac.values())
