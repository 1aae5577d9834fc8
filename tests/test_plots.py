"""Grid figures and the summary table (utils/plots.py): the files exist, and what is drawn is the
mean (and sample std) over seeds of the finished cells' numbers; failed cells never count."""
import csv
import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from helpers import REPO, assert_one_line_error
from utils import plots

LAYERS = ["conv1", "layer1.0.conv1", "layer1.0.conv2", "layer2.0.conv1", "fc"]


def cell(criterion, target, seed, acc_ft, acc_pr, loss, ops, params, layers, status="done"):
    return {"model": "resnet20", "dataset": "cifar10", "mode": "oneshot",
            "criterion": criterion, "target": target, "seed": seed, "status": status,
            "error": None if status == "done" else "RuntimeError: diverged",
            "achieved_ops_ratio": ops, "achieved_params_ratio": params,
            "test_acc_dense": {0: 92.0, 1: 93.0}[seed], "test_acc_pruned": acc_pr,
            "test_acc_finetuned": acc_ft, "test_loss_pruned": loss, "seconds_importance": 1.5,
            "wall_seconds": 30.0, "result_path": f"cells/{criterion}_{target}_{seed}/results.json",
            "layer_keep_fraction": dict(zip(LAYERS, layers))}


def fixture_rows():
    """2 criteria x 2 targets; OBA with 2 seeds, Weight with 1, and one failed Weight cell whose
    numbers would move every mean if it were counted."""
    return [
        cell("OBA", 0.5, 0, 91.0, 80.0, 0.5, 0.49, 0.55, [1.0, 0.5, 0.75, 0.5, 1.0]),
        cell("OBA", 0.5, 1, 92.0, 84.0, 0.7, 0.47, 0.53, [1.0, 0.25, 0.75, 0.5, 1.0]),
        cell("OBA", 0.25, 0, 89.0, 50.0, 1.5, 0.24, 0.30, [0.5, 0.25, 0.5, 0.25, 1.0]),
        cell("OBA", 0.25, 1, 88.0, 40.0, 2.5, 0.22, 0.28, [0.75, 0.25, 0.5, 0.5, 1.0]),
        cell("Weight", 0.5, 0, 90.0, 60.0, 3.0, 0.48, 0.50, [1.0, 0.5, 0.5, 0.5, 1.0]),
        cell("Weight", 0.25, 0, 85.0, 20.0, 20.0, 0.23, 0.26, [0.25, 0.5, 0.25, 0.25, 1.0]),
        cell("Weight", 0.25, 1, 5.0, 1.0, 900.0, 0.9, 0.9, [0.0] * 5, status="failed"),
    ]


def latency_rows():
    rows = []
    for batch, scale in ((1, 1.0), (4, 3.0)):
        for variant, crit, target, macs, ms in (("dense", None, None, 40e6, 2.0),
                                                ("OBA 0.5 s0", "OBA", 0.5, 20e6, 1.2),
                                                ("Weight 0.5 s0", "Weight", 0.5, 19e6, 1.1)):
            rows.append({"variant": variant, "criterion": crit, "target": target, "seed": 0,
                         "device": "cpu", "batch_size": batch, "macs": macs, "params": 1e5,
                         "median_ms": ms * scale, "images_per_s": 1000 * batch / (ms * scale),
                         "model": "resnet20", "dataset": "cifar10", "device_name": "cpu"})
    return rows


def write_grid(root, rows=None, latency=True):
    root.mkdir(parents=True, exist_ok=True)
    (root / "results.json").write_text(json.dumps(fixture_rows() if rows is None else rows))
    if latency:
        (root / "latency.json").write_text(json.dumps(latency_rows()))
    return root


def expected(rows, key, x=lambda r: r["achieved_ops_ratio"]):
    """{criterion: sorted [(mean x, mean y, sample std y, n)]} over finished cells, by hand."""
    groups = {}
    for r in rows:
        if r["status"] == "done":
            groups.setdefault(r["criterion"], {}).setdefault(r["target"], []).append(r)
    out = {}
    for crit, per_t in groups.items():
        pts = []
        for cells in per_t.values():
            ys = [c[key] for c in cells]
            pts.append((np.mean([x(c) for c in cells]), np.mean(ys),
                        np.std(ys, ddof=1) if len(ys) > 1 else 0.0, len(ys)))
        out[crit] = sorted(pts)
    return out


def drawn(ax):
    """{label: (x, y, half-length of each error bar or None)} of an axes' errorbar series."""
    out = {}
    for c in ax.containers:
        line, _, bars = c.lines
        errs = None
        if c.has_yerr:
            errs = [abs(seg[1][1] - seg[0][1]) / 2 for seg in bars[0].get_segments()]
        out[c.get_label()] = (np.asarray(line.get_xdata(), float),
                              np.asarray(line.get_ydata(), float), errs)
    return out


@pytest.fixture(scope="module")
def figures():
    notes = []
    figs = plots.build_figures(fixture_rows(), latency_rows(), say=notes.append)
    return figs, notes


def test_accuracy_points_are_seed_means_with_std_bars(figures):
    figs, notes = figures
    assert any("failed cell Weight target 0.25 seed 1" in n for n in notes)
    for stage in ("finetuned", "pruned"):
        ax = figs[f"accuracy_{stage}"].axes[0]
        got = drawn(ax)
        want = expected(fixture_rows(), f"test_acc_{stage}")
        assert set(got) == {"OBA", "Weight"}
        for crit, pts in want.items():
            x, y, errs = got[crit]
            np.testing.assert_allclose(x, [p[0] for p in pts])
            np.testing.assert_allclose(y, [p[1] for p in pts])
            if crit == "OBA":  # two seeds: bars of one sample std
                np.testing.assert_allclose(errs, [p[2] for p in pts])
            else:  # one seed (the failed one does not count): no bars
                assert errs is None
        # The dense accuracy: dashed line at the mean over seeds of the dense network.
        dense = [ln for ln in ax.get_lines() if ln.get_label().startswith("dense")]
        assert len(dense) == 1 and dense[0].get_linestyle() == "--"
        np.testing.assert_allclose(dense[0].get_ydata(), [92.5, 92.5])
        assert "fraction of dense MACs" in ax.get_xlabel() and "%" in ax.get_ylabel()
        assert "resnet20 / cifar10 / oneshot" in ax.get_title()
    # OBA at 0.25 after fine-tuning: by hand, mean 88.5, std sqrt(0.5).
    x, y, errs = drawn(figs["accuracy_finetuned"].axes[0])["OBA"]
    assert y[0] == pytest.approx(88.5) and errs[0] == pytest.approx(0.5 ** 0.5)


def test_loss_after_pruning_against_fraction_pruned(figures):
    figs, _ = figures
    ax = figs["loss_pruned"].axes[0]
    got = drawn(ax)
    want = expected(fixture_rows(), "test_loss_pruned", x=lambda r: 1 - r["achieved_ops_ratio"])
    for crit, pts in want.items():
        x, y, _ = got[crit]
        np.testing.assert_allclose(x, [p[0] for p in pts])
        np.testing.assert_allclose(y, [p[1] for p in pts])
    assert ax.get_yscale() == "log"  # 0.6 ... 20: a wide range
    assert "pruned" in ax.get_xlabel()
    # A narrow range stays linear.
    narrow = [dict(r, test_loss_pruned=1.0 + 0.1 * i) for i, r in enumerate(fixture_rows())]
    ax = plots.build_figures(narrow, say=None)["loss_pruned"].axes[0]
    assert ax.get_yscale() == "linear"


def test_layer_fractions_at_the_smallest_target_by_default(figures):
    figs, _ = figures
    assert "layers_0.25" in figs and "layers_0.5" not in figs
    ax = figs["layers_0.25"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == LAYERS
    got = drawn(ax)
    oba = [r["layer_keep_fraction"] for r in fixture_rows()
           if r["criterion"] == "OBA" and r["target"] == 0.25]
    np.testing.assert_allclose(got["OBA"][1], [np.mean([f[n] for f in oba]) for n in LAYERS])
    np.testing.assert_allclose(got["OBA"][2], [np.std([f[n] for f in oba], ddof=1) for n in LAYERS])
    np.testing.assert_allclose(got["Weight"][1], [0.25, 0.5, 0.25, 0.25, 1.0])  # failed one left out
    np.testing.assert_allclose(got["Weight"][0], range(len(LAYERS)))
    # --layers_target picks another target; an absent one the nearest, with a note.
    notes = []
    figs = plots.build_figures(fixture_rows(), layers_target=0.4, say=notes.append)
    assert "layers_0.5" in figs and any("nearest, 0.5" in n for n in notes)
    np.testing.assert_allclose(drawn(figs["layers_0.5"].axes[0])["Weight"][1],
                               [1.0, 0.5, 0.5, 0.5, 1.0])


def test_layer_order_comes_from_the_cells_that_recorded_it():
    """Older cells stored layer_keep_fraction with sorted keys and no layer_order: a grid
    mixing them with newer cells draws the layers in the recorded network order."""
    network = ["features.0", "features.3", "features.10", "classifier"]
    old = {"features.0": 1.0, "features.3": 0.5, "features.10": 0.25, "classifier": 1.0}
    rows = [dict(cell("Weight", 0.5, 0, 90, 60, 3.0, 0.5, 0.5, [1] * 5),
                 layer_keep_fraction=dict(sorted(old.items()))),
            dict(cell("OBA", 0.5, 0, 91, 80, 0.5, 0.5, 0.5, [1] * 5),
                 layer_keep_fraction=dict(sorted(old.items())), layer_order=network)]
    ax = plots.build_figures(rows, say=None)["layers_0.5"].axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == network
    np.testing.assert_allclose(drawn(ax)["Weight"][1], [1.0, 0.5, 0.25, 1.0])


def test_latency_figure_from_the_benchmark_rows(figures):
    figs, _ = figures
    fig = figs["latency_cpu"]
    assert len(fig.axes) == 2  # batch 1 and batch 4
    for ax, scale in zip(fig.axes, (1.0, 3.0)):
        lines = {ln.get_label(): ln for ln in ax.get_lines()}
        np.testing.assert_allclose(lines["dense"].get_xdata(), [40.0])
        np.testing.assert_allclose(lines["dense"].get_ydata(), [2.0 * scale])
        assert lines["dense"].get_marker() == "*"
        np.testing.assert_allclose(lines["OBA"].get_xdata(), [20.0])
        np.testing.assert_allclose(lines["OBA"].get_ydata(), [1.2 * scale])
        np.testing.assert_allclose(lines["Weight"].get_ydata(), [1.1 * scale])
        assert ax.get_xlabel() == "MACs per image (M)" and "ms" in ax.get_ylabel()


def test_make_plots_writes_png_and_svg_and_skips_what_has_no_data(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid")
    paths = plots.make_plots(grid)
    names = sorted(p.name for p in paths)
    stems = ["accuracy_finetuned", "accuracy_pruned", "latency_cpu", "layers_0.25", "loss_pruned"]
    assert names == sorted(f"{s}.{e}" for s in stems for e in ("png", "svg"))
    for p in paths:
        assert p.parent == grid / "plots" and p.stat().st_size > 1000
        head = p.read_bytes()[:200]
        assert head.startswith(b"\x89PNG") if p.suffix == ".png" else b"<svg" in p.read_bytes()
    assert not list((grid / "plots").glob(".*tmp"))
    # No latency file and no fine-tuning: those figures are skipped with a note, not drawn empty.
    rows = [dict(r, test_acc_finetuned=None) for r in fixture_rows()]
    bare = write_grid(tmp_path / "bare", rows, latency=False)
    names = {p.stem for p in plots.make_plots(bare)}
    assert names == {"accuracy_pruned", "layers_0.25", "loss_pruned"}
    out = capsys.readouterr().out
    assert "test_acc_finetuned" in out and "latency" in out


def test_csv_fallback_gives_the_same_figures(tmp_path):
    rows = fixture_rows()
    grid = tmp_path / "grid"
    grid.mkdir()
    keys = [k for k in rows[0] if k != "layer_keep_fraction"]
    with open(grid / "results.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        for r in rows:
            w.writerow({k: "" if r[k] is None else r[k] for k in keys})
    loaded = plots.load_rows(grid)
    assert [r["seed"] for r in loaded] == [r["seed"] for r in rows]
    assert loaded[0]["criterion"] == "OBA" and loaded[0]["test_acc_finetuned"] == 91.0
    assert loaded[0]["error"] is None and loaded[-1]["status"] == "failed"
    got = drawn(plots.build_figures(loaded, say=None)["accuracy_finetuned"].axes[0])
    want = drawn(plots.build_figures(rows, say=None)["accuracy_finetuned"].axes[0])
    for crit in want:
        np.testing.assert_allclose(got[crit][1], want[crit][1])
    names = {p.stem for p in plots.make_plots(grid, say=None)}
    assert "layers_0.25" not in names and "accuracy_finetuned" in names  # no layer column


def test_summary_table_means_and_stds_by_hand():
    table = plots.summary_table(fixture_rows())
    lines = table.strip().splitlines()
    assert lines[0].startswith("| criterion | target (MACs kept) | test acc. fine-tuned (%)")
    # dense: seeds 0 and 1 -> 92.0, 93.0: mean 92.50, std 0.71
    assert lines[2] == "| dense | — | 92.50 ± 0.71 | — | — | — | 2 |"
    # OBA 0.5: ft 91, 92 -> 91.50 ± 0.71; pruned 80, 84 -> 82.00 ± 2.83;
    # weights 45, 47 % -> 46.00 ± 1.41; MACs 51, 53 % -> 52.00 ± 1.41
    assert lines[3] == "| OBA | 0.5 | 91.50 ± 0.71 | 82.00 ± 2.83 | 46.00 ± 1.41 | 52.00 ± 1.41 | 2 |"
    assert lines[4] == "| Weight | 0.5 | 90.00 | 60.00 | 50.00 | 52.00 | 1 |"
    # OBA 0.25: ft 89, 88; pruned 50, 40; weights 70, 72 %; MACs 76, 78 %
    assert lines[5] == "| OBA | 0.25 | 88.50 ± 0.71 | 45.00 ± 7.07 | 71.00 ± 1.41 | 77.00 ± 1.41 | 2 |"
    assert lines[6] == "| Weight | 0.25 | 85.00 | 20.00 | 74.00 | 77.00 | 1 (+1 failed) |"
    assert len(lines) == 7
    assert statistics.stdev([80.0, 84.0]) == pytest.approx(2.83, abs=0.005)


def test_cells_not_run_are_counted_apart_from_failed_ones():
    rows = fixture_rows() + [dict(cell("Weight", 0.5, 1, 0, 0, 0, 0, 0, [0] * 5),
                                  status="not run", error=None)]
    table = plots.summary_table(rows)
    assert "| Weight | 0.5 | 90.00 |" in table and "| 1 (+1 not run) |" in table
    assert "| 1 (+1 failed) |" in table  # Weight at 0.25
    notes = []
    plots.build_figures(rows, say=notes.append)
    assert any("seed 1" in n and "not run" in n for n in notes)


def test_unstructured_cells_use_density():
    rows = []
    for r in fixture_rows():
        r = dict(r, mode="unstructured", achieved_density=r["achieved_ops_ratio"])
        del r["achieved_ops_ratio"], r["achieved_params_ratio"]
        rows.append(r)
    figs = plots.build_figures(rows, say=None)
    ax = figs["accuracy_finetuned"].axes[0]
    assert "density" in ax.get_xlabel()
    want = expected(fixture_rows(), "test_acc_finetuned")
    np.testing.assert_allclose(drawn(ax)["OBA"][0], [p[0] for p in want["OBA"]])
    line = plots.summary_table(rows).splitlines()[3]
    assert line == "| OBA | 0.5 | 91.50 ± 0.71 | 82.00 ± 2.83 | 52.00 ± 1.41 | — | 2 |"


def test_command_line(tmp_path, capsys):
    grid = write_grid(tmp_path / "grid")
    assert plots.main([str(grid), "--layers_target", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "| OBA | 0.5 |" in out and "10 files written" in out
    assert (grid / "plots" / "layers_0.5.png").is_file()
    proc = subprocess.run([sys.executable, "-m", "utils.plots", str(tmp_path / "missing")],
                          capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 2
    assert_one_line_error(proc, "missing", "not a folder")



def test_a_criterion_looks_the_same_in_every_grid_and_labels_stay_distinct():
    one = plots.Styles(["OBA", "Weight", "Eigen"])
    other = plots.Styles(["Eigen", "Slim", "C-OBS", "OBA"])
    for c in ("OBA", "Eigen"):
        assert one(c) == other(c)
    # ablation labels take places no criterion of their grid holds, also when added later
    mixed = plots.Styles(["OBA", "eval mode", "no BN re-estimation"])
    mixed("Weight")
    looks = [tuple(mixed(c).items()) for c in ("OBA", "eval mode", "no BN re-estimation",
                                               "Weight", "late label")]
    assert len(set(looks)) == len(looks)
    assert mixed("OBA") == one("OBA")
