"""compare.py, the grid runner: cells, results files, table, plots, skipping and resuming."""
import csv
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import REPO, run_script

SCRIPT = ["--num_epochs", "1", "--lr", "0.05", "--batch_size", "32", "--sl_num_epochs", "1",
          "--iterative_steps", "2", "--iters_per_step", "2", "--bn_recalibration_batches", "2",
          "--no-tensorboard", "--device", "cpu"]


def grid(out, *extra, criteria=("Weight", "Taylor"), targets=("0.7", "0.5"), seeds=("0",)):
    return ["--dataset", "digits", "--model", "resnet8", "--criteria", *criteria, "--targets",
            *targets, "--seeds", *seeds, "--output_dir", str(out), *extra, "--", *SCRIPT]


def mtimes(out):
    return {p: p.stat().st_mtime_ns for p in Path(out).rglob("results.json") if "cells" in p.parts}


def test_grid_writes_csv_table_plots_and_skips_finished_cells(tmp_path):
    out = tmp_path / "grid"
    proc = run_script("compare.py", *grid(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = list(csv.DictReader((out / "results.csv").open()))
    assert {(r["criterion"], float(r["target"])) for r in rows} == {
        (c, t) for c in ("Weight", "Taylor") for t in (0.7, 0.5)}
    cells = json.loads((out / "results.json").read_text())
    for row, cell in zip(rows, cells):
        assert row["status"] == "done" and cell["status"] == "done"
        rec = json.loads((out / cell["result_path"]).read_text())
        # the CSV carries the cell's own numbers, not something recomputed
        assert float(row["test_acc_finetuned"]) == pytest.approx(rec["test_acc_finetuned"])
        assert float(row["achieved_ops_ratio"]) == pytest.approx(rec["achieved_ops_ratio"])
        assert rec["achieved_ops_ratio"] <= float(row["target"])
        assert cell["layer_keep_fraction"] and all(0 < f <= 1 for f in cell["layer_keep_fraction"].values())
    table = (out / "table.md").read_text()
    assert "Weight" in table and "Taylor" in table and "compare.py" in table
    pngs = sorted((out / "plots").glob("*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    assert {p.stem for p in pngs} == {p.stem for p in (out / "plots").glob("*.svg")}
    # all four cells came from one shared dense network
    assert len({c["test_acc_dense"] for c in cells}) == 1
    assert [p.name for p in (out / "dense").glob("*.pth") if ".train." not in p.name] == [
        "digits_resnet8.pth"]
    # the plotted points are the CSV's numbers (one seed: the points are the cells themselves)
    from utils.plots import build_figures, load_rows
    fig = build_figures(load_rows(out))["accuracy_finetuned"]
    plotted = {bars.get_label(): sorted(zip(bars.lines[0].get_xdata(), bars.lines[0].get_ydata()))
               for bars in fig.axes[0].containers}
    for crit in ("Weight", "Taylor"):
        expected = sorted((float(r["achieved_ops_ratio"]), float(r["test_acc_finetuned"]))
                          for r in rows if r["criterion"] == crit)
        flat = [v for point in plotted[crit] for v in point]
        assert flat == pytest.approx([v for point in expected for v in point])

    before = mtimes(out)
    again = run_script("compare.py", *grid(out))
    assert again.returncode == 0, again.stdout + again.stderr
    assert "start:" not in again.stdout  # nothing re-run
    assert mtimes(out) == before
    assert list(csv.DictReader((out / "results.csv").open())) == rows
    # --collect_only runs nothing: a seed never run is listed as such, the table counts one seed
    collected = run_script("compare.py", *grid(out, "--collect_only", "--no-plots", seeds=("0", "1")))
    assert collected.returncode == 0, collected.stdout + collected.stderr
    assert "start:" not in collected.stdout and mtimes(out) == before
    more = list(csv.DictReader((out / "results.csv").open()))
    assert [r for r in more if r["seed"] == "0"] == rows
    assert {(r["status"], r["error"]) for r in more if r["seed"] == "1"} == {("not run", "")}


def test_killed_grid_resumes_without_redoing_finished_cells(tmp_path):
    """An ablation grid (two variants of one criterion) killed with SIGKILL after its first cell:
    the re-run finishes the rest and leaves the finished cell alone."""
    out = tmp_path / "grid"
    args = grid(out, "--no-plots", "--variants", "base=", "nonorm=--normalizer none",
                criteria=("Weight",), targets=("0.7",))
    runner = subprocess.Popen([sys.executable, str(REPO / "compare.py"), *args], cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
    first = out / "cells" / "Weight@base" / "seed0" / "ops_0.7" / "results.json"
    deadline = time.time() + 600
    while not first.exists() and time.time() < deadline and runner.poll() is None:
        time.sleep(0.2)
    assert first.exists(), runner.communicate()[0]
    # SIGKILL: no clean-up at all, the running cell's process killed with it
    subprocess.run(["pkill", "-KILL", "-f", str(out)])
    runner.wait(timeout=60)
    done = first.stat().st_mtime_ns

    proc = run_script("compare.py", *args)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "start: Weight@base" not in proc.stdout
    assert first.stat().st_mtime_ns == done
    rows = json.loads((out / "results.json").read_text())
    assert [(r["criterion"], r["status"]) for r in rows] == [("Weight@base", "done"),
                                                           ("Weight@nonorm", "done")]
    assert rows[1]["variant_flags"] == "--normalizer none"
    nonorm = json.loads((out / rows[1]["result_path"]).read_text())
    assert nonorm["settings"]["normalizer"] == "none"
    assert json.loads(first.read_text())["settings"]["normalizer"] == "max"
    # the table's command is quoted as typed, so it can be pasted back into a shell
    command = (out / "table.md").read_text().split("Command: `", 1)[1].split("`", 1)[0]
    assert "'nonorm=--normalizer none'" in command
    assert shlex.split(command)[2:] == args


def test_failed_cell_is_recorded_and_not_retried(tmp_path):
    out = tmp_path / "grid"
    # at most 10 % of any layer removed: 0.1 of the MACs cannot be reached
    args = grid(out, "--no-plots", criteria=("Weight",), targets=("0.1",))
    args.insert(args.index("--") + 1, "--max_pruning_ratio")
    args.insert(args.index("--") + 2, "0.1")
    proc = run_script("compare.py", *args)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = json.loads((out / "results.json").read_text())
    assert rows[0]["status"] == "failed" and "max_pruning_ratio" in rows[0]["error"]
    again = run_script("compare.py", *args)
    assert "start:" not in again.stdout


@pytest.mark.parametrize("bad, words", [
    (["--criteria", "Nope"], ["Nope"]),
    (["--targets", "1.5"], ["--targets", "1.5"]),
    (["--jobs", "0"], ["--jobs"]),
    (["--variants", "a b=--normalizer none"], ["--variants"]),
    (["--variants", "x=--normalizer"], ["--normalizer"]),
    (["--", "--seed", "3"], ["--seed", "compare.py"]),
    (["--", "--num_epochs", "-1"], ["--num_epochs"]),
])
def test_bad_grid_requests_are_one_line_errors(tmp_path, capsys, bad, words):
    """In this process, through the script's real error boundary (cli.run_main)."""
    import compare
    from utils import cli
    out = tmp_path / "grid"
    base = ["--dataset", "digits", "--model", "resnet8", "--output_dir", str(out)]
    before = signal.getsignal(signal.SIGTERM)  # run_main installs its own handler
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.run_main(compare.main, base + bad)
    finally:
        signal.signal(signal.SIGTERM, before)
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, err
    assert not out.exists()
