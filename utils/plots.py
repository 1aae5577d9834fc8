"""Figures and the summary table of a pruning grid (criteria x targets x seeds).

    python -m utils.plots <grid_dir> [--latency latency.json] [--layers_target 0.2]

Reads `<grid_dir>/results.json` (a list of cell records, one per criterion x target x seed; falls
back to `results.csv`) and writes a PNG and an SVG of every figure into `<grid_dir>/plots/`:

  accuracy_finetuned   test accuracy after fine-tuning vs fraction of dense MACs kept
  accuracy_pruned      the same, right after pruning (before fine-tuning)
  loss_pruned          test loss right after pruning vs fraction of MACs pruned
                       (the shape of the EigenDamage paper's Figure 5)
  layers_<target>      fraction of every layer's output channels kept at one target (its Figure 4)
  latency_<device>     measured latency vs MACs, one panel per batch size (the JSON that
                       bench/latency.py writes; `<grid_dir>/latency.json` is used when present)

A point is the mean over the seeds of one (criterion, target); its error bar is the sample
standard deviation (n - 1) when there are several seeds. Unstructured grids put the weight
density on the x axis instead of the MACs ratio. Failed cells are skipped and a figure without
data is left out, each with a printed note. The figures are matplotlib `Figure` objects rendered
by Agg, never pyplot: nothing is displayed and no global figure state is shared with the caller.

Cell record (the grid runner's contract): model, dataset, mode ("oneshot" | "iterative" |
"unstructured"), criterion, target, seed, status ("done" | "failed" | "not run"), error,
achieved_ops_ratio (unstructured: achieved_density), achieved_params_ratio, test_acc_dense,
test_acc_pruned, test_acc_finetuned (may be null), test_loss_pruned, seconds_importance,
wall_seconds and layer_keep_fraction {layer name: fraction of its original output channels kept}, network order.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import matplotlib
from matplotlib.figure import Figure

from utils.checkpoint import _atomic_write

FIGSIZE = (7.0, 4.5)
DPI = 150
STYLE = {"font.size": 10, "axes.titlesize": 11, "axes.labelsize": 10, "legend.fontsize": 8.5,
         "xtick.labelsize": 9, "ytick.labelsize": 9, "axes.grid": True, "grid.alpha": 0.3,
         "svg.fonttype": "none"}  # SVG text stays text (searchable, editable)
MARKERS = "osD^vP*Xh<>p"
# tab10 and two more, so the eleven criteria of a full grid get eleven colours (dense is black)
COLORS = tuple(matplotlib.colormaps["tab10"].colors) + ("navy", "darkgoldenrod")
# The suite's criteria keep these places in COLORS / MARKERS in every figure of every grid, so
# OBA looks the same in the vgg19 and the resnet32 plots; other labels (ablation variants) take
# the places after them, in order of appearance.
CRITERIA_STYLE_ORDER = ("Weight", "Random", "Taylor", "OBA", "fastOBA", "C-OBD", "Kron-OBD",
                        "Kron-OBS", "Eigen", "C-OBS", "Slim")
FORMATS = ("png", "svg")
# Text columns of results.csv; every other column is read as JSON (numbers, null, dicts).
TEXT_COLUMNS = {"model", "dataset", "mode", "criterion", "status", "error", "result_path"}

Say = Callable[[str], None]


class PlotError(ValueError):
    """Results that cannot be plotted; the message names the file and the fix."""


# ----------------------------------------------------------------------------- reading

def load_rows(grid_dir) -> List[dict]:
    """The cell records of a grid: results.json (a list), else results.csv."""
    grid = Path(grid_dir)
    if not grid.is_dir():
        raise PlotError(f"{grid} is not a folder; pass the folder the grid runner wrote")
    path = grid / "results.json"
    if path.is_file():
        try:
            rows = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            raise PlotError(f"{path} cannot be read ({type(err).__name__}: "
                            f"{str(err).splitlines()[0][:120]}); run the grid again or pass "
                            "another folder") from None
        if isinstance(rows, dict) and isinstance(rows.get("cells"), list):
            rows = rows["cells"]
        if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
            raise PlotError(f"{path} is not a list of cell records; pass a grid runner's folder")
        return rows
    path = grid / "results.csv"
    if path.is_file():
        return _read_csv(path)
    raise PlotError(f"no results.json or results.csv in {grid}; pass the folder the grid runner "
                    "wrote")


def _csv_value(key: str, text: Optional[str]):
    text = (text or "").strip()
    if text == "" or text.lower() in ("none", "null"):
        return None
    if key in TEXT_COLUMNS:
        return text
    try:
        return json.loads(text)  # numbers, NaN, true/false, a JSON dict of layer fractions
    except ValueError:
        return text


def _read_csv(path: Path) -> List[dict]:
    try:
        with open(path, newline="") as f:
            rows = [{k: _csv_value(k, v) for k, v in r.items() if k is not None}
                    for r in csv.DictReader(f)]
    except (OSError, csv.Error, UnicodeDecodeError) as err:
        raise PlotError(f"{path} cannot be read ({type(err).__name__}); run the grid again or "
                        "pass another folder") from None
    for r in rows:
        if isinstance(r.get("seed"), float) and r["seed"].is_integer():
            r["seed"] = int(r["seed"])
    return rows


def load_latency(path) -> List[dict]:
    """The rows bench/latency.py writes with --json."""
    path = Path(path)
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise PlotError(f"latency file {path} cannot be read ({type(err).__name__}); pass the "
                        "--json file of bench/latency.py") from None
    need = {"variant", "device", "batch_size", "macs", "median_ms"}
    if not isinstance(rows, list) or not all(isinstance(r, dict) and need <= r.keys() for r in rows):
        raise PlotError(f"latency file {path} is not a list of rows with {', '.join(sorted(need))}; "
                        "pass the --json file of bench/latency.py")
    return rows


# ----------------------------------------------------------------------------- aggregation

def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _tkey(target) -> float:
    """Targets as dictionary keys: 0.1 written by two writers is one target."""
    return round(float(target), 9)


def describe(cell: dict) -> str:
    target = cell.get("target")
    target = f"{target:g}" if _finite(target) else str(target)
    return f"{cell.get('criterion')} target {target} seed {cell.get('seed')}"


def finished(rows: Iterable[dict], say: Optional[Say] = print) -> List[dict]:
    """The cells that finished; a note for every other one."""
    done = []
    for r in rows:
        if r.get("status", "done") == "done":
            done.append(r)
        elif say and r.get("status") == "not run":
            say(f"note: skipping cell {describe(r)}: not run")
        elif say:
            say(f"note: skipping failed cell {describe(r)}: {r.get('error') or 'no error recorded'}")
    return done


def run_identity(cell: dict) -> Tuple[str, str, str]:
    return (str(cell.get("model")), str(cell.get("dataset")), str(cell.get("mode")))


def by_run(rows: Iterable[dict]) -> Dict[Tuple[str, str, str], List[dict]]:
    """Cells grouped by (model, dataset, mode), in order of first appearance."""
    groups: Dict[Tuple[str, str, str], List[dict]] = {}
    for r in rows:
        groups.setdefault(run_identity(r), []).append(r)
    return groups


def criteria_order(rows: Iterable[dict]) -> List[str]:
    seen: Dict[str, None] = {}
    for r in rows:
        seen.setdefault(str(r.get("criterion")), None)
    return list(seen)


def unstructured(mode: str) -> bool:
    return mode == "unstructured"


def kept_ratio(cell: dict) -> Optional[float]:
    """x of a cell: MACs kept (structured) or weight density (unstructured)."""
    return cell.get("achieved_density" if unstructured(cell.get("mode")) else "achieved_ops_ratio")


def mean_std(values: Sequence[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for one value)."""
    values = list(values)
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


@dataclass
class Point:
    target: float
    x: float       # mean over seeds
    y: float       # mean over seeds
    std: float     # of y over seeds (n - 1), 0 for one seed
    n: int


def series(cells: Iterable[dict], x: Callable[[dict], object],
           y: Callable[[dict], object]) -> Dict[str, List[Point]]:
    """{criterion: one Point per target (mean over seeds), sorted by x}; cells whose x or y is
    missing or not finite are left out."""
    acc: Dict[str, Dict[float, List[Tuple[float, float]]]] = {}
    for c in cells:
        xv, yv = x(c), y(c)
        if _finite(xv) and _finite(yv) and _finite(c.get("target")):
            acc.setdefault(str(c.get("criterion")), {}).setdefault(
                _tkey(c["target"]), []).append((float(xv), float(yv)))
    out = {}
    for crit, per_target in acc.items():
        points = []
        for t, xy in per_target.items():
            ym, ys = mean_std([v for _, v in xy])
            points.append(Point(t, statistics.fmean(u for u, _ in xy), ym, ys, len(xy)))
        out[crit] = sorted(points, key=lambda p: p.x)
    return out


def dense_value(cells: Iterable[dict], key: str) -> Optional[float]:
    """Mean over seeds of a dense-network figure that every cell repeats (one value per seed)."""
    per_seed: Dict[object, float] = {}
    for c in cells:
        if _finite(c.get(key)):
            per_seed.setdefault(c.get("seed"), float(c[key]))
    return statistics.fmean(per_seed.values()) if per_seed else None


# ----------------------------------------------------------------------------- figures

class Styles:
    """One colour and marker per criterion: the suite's criteria keep their place in
    CRITERIA_STYLE_ORDER (the same look in every grid), other labels (ablation variants) take
    the places no criterion of this grid holds, so all stay distinct within a grid."""

    def __init__(self, criteria: Sequence[str]):
        self.index: Dict[str, int] = {}
        for c in sorted(criteria, key=lambda c: c not in CRITERIA_STYLE_ORDER):  # suite's first
            self._place(c)

    def _place(self, criterion: str) -> int:
        if criterion not in self.index:
            taken = set(self.index.values())
            own = CRITERIA_STYLE_ORDER.index(criterion) \
                if criterion in CRITERIA_STYLE_ORDER else None
            self.index[criterion] = own if own is not None and own not in taken else next(
                i for i in range(len(taken) + 1) if i not in taken)
        return self.index[criterion]

    def __call__(self, criterion: str) -> dict:
        i = self._place(criterion)
        return {"color": COLORS[i % len(COLORS)], "marker": MARKERS[i % len(MARKERS)]}


def _figure(size=FIGSIZE) -> Figure:
    return Figure(figsize=size, dpi=DPI, layout="tight")


def _title(ident: Tuple[str, str, str], what: str) -> str:
    model, dataset, mode = ident
    return f"{model} / {dataset} / {mode}: {what}"


def _draw_series(ax, data: Dict[str, List[Point]], styles: Styles) -> None:
    for crit, points in data.items():
        spread = any(p.n > 1 for p in points)
        ax.errorbar([p.x for p in points], [p.y for p in points],
                    yerr=[p.std for p in points] if spread else None, label=crit, capsize=3,
                    linewidth=1.5, markersize=5, elinewidth=1, **styles(crit))


def _ratio_label(mode: str, pruned: bool = False) -> str:
    if unstructured(mode):
        return ("weights pruned (1 − density)" if pruned
                else "weights kept (density, fraction of dense)")
    return ("MACs pruned (fraction of dense MACs)" if pruned
            else "MACs kept (fraction of dense MACs)")


def _dense_line(ax, value: float, label: str) -> None:
    """The dense network's level as a dashed line, kept clear of the frame."""
    ax.axhline(value, linestyle="--", color="0.25", linewidth=1, label=label)
    lo, hi = ax.get_ylim()
    pad = 0.05 * (hi - lo)
    if ax.get_yscale() == "linear":
        ax.set_ylim(min(lo, value - pad), max(hi, value + pad))


def accuracy_figure(cells: List[dict], stage: str, ident, styles: Styles) -> Optional[Figure]:
    """Test accuracy `stage` ('finetuned' or 'pruned') vs the ratio kept, per criterion."""
    mode = ident[2]
    data = series(cells, kept_ratio, lambda c: c.get(f"test_acc_{stage}"))
    if not data:
        return None
    with matplotlib.rc_context(STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        _draw_series(ax, data, styles)
        dense = dense_value(cells, "test_acc_dense")
        if dense is not None:
            _dense_line(ax, dense, f"dense ({dense:.2f} %)")
        ax.set_xlabel(_ratio_label(mode))
        ax.set_ylabel("test accuracy (%)")
        when = "after fine-tuning" if stage == "finetuned" else "right after pruning"
        ax.set_title(_title(ident, f"test accuracy {when}"))
        ax.legend(loc="best")
    return fig


def loss_figure(cells: List[dict], ident, styles: Styles) -> Optional[Figure]:
    """Test loss right after pruning vs the fraction pruned (EigenDamage Figure 5)."""
    mode = ident[2]

    def pruned_fraction(c):
        r = kept_ratio(c)
        return 1.0 - r if _finite(r) else None

    data = series(cells, pruned_fraction, lambda c: c.get("test_loss_pruned"))
    if not data:
        return None
    ys = [p.y for pts in data.values() for p in pts]
    with matplotlib.rc_context(STYLE):
        fig = _figure()
        ax = fig.add_subplot()
        _draw_series(ax, data, styles)
        dense = dense_value(cells, "test_loss_dense")
        if dense is not None:
            ys.append(dense)
        # A wide range (a criterion that collapses the network next to one that barely moves it)
        # is only readable on a log scale.
        if min(ys) > 0 and max(ys) / min(ys) > 10:
            ax.set_yscale("log", nonpositive="clip")
        if dense is not None:
            _dense_line(ax, dense, f"dense ({dense:.3g})")
        ax.set_xlabel(_ratio_label(mode, pruned=True))
        ax.set_ylabel("test loss right after pruning (cross-entropy)")
        ax.set_title(_title(ident, "loss right after pruning"))
        ax.legend(loc="best")
    return fig


def _layer_order(cell: dict) -> List[str]:
    """The cell's layers in network order: its `layer_order` list when recorded (JSON files sort
    the keys of `layer_keep_fraction`), else the dict's own order unless that is alphabetical
    (then the order was lost: natural order, features.3 before features.10)."""
    fractions = cell["layer_keep_fraction"]
    order = cell.get("layer_order")
    if isinstance(order, list) and set(order) == set(fractions):
        return order
    if list(fractions) != sorted(fractions):  # insertion order survived: it is the network's
        return list(fractions)
    return sorted(fractions, key=lambda n: [int(t) if t.isdigit() else t
                                            for t in re.split(r"(\d+)", n)])


def layers_figure(cells: List[dict], ident, styles: Styles, target: Optional[float] = None,
                  say: Optional[Say] = print) -> Tuple[Optional[float], Optional[Figure]]:
    """Fraction of every layer's output channels kept at one target (EigenDamage Figure 4).
    `target`: that target (the nearest present one, with a note, if absent); default the
    smallest present. Returns (the target drawn, the figure)."""
    cells = [c for c in cells if isinstance(c.get("layer_keep_fraction"), dict)
             and c["layer_keep_fraction"] and _finite(c.get("target"))]
    if not cells:
        return None, None
    present = sorted({_tkey(c["target"]) for c in cells})
    chosen = present[0] if target is None else min(present, key=lambda t: abs(t - target))
    if target is not None and abs(chosen - target) > 1e-9 and say:
        say(f"note: no per-layer fractions at target {target:g}; drawing the nearest, "
            f"{chosen:g} (present: {', '.join(f'{t:g}' for t in present)})")
    at = [c for c in cells if _tkey(c["target"]) == chosen]
    names: Dict[str, None] = {}
    # Network order, taken first from the cells that recorded it; a layer only some criteria
    # report keeps its place.
    for c in sorted(at, key=lambda c: not isinstance(c.get("layer_order"), list)):
        for name in _layer_order(c):
            names.setdefault(name, None)
    names = list(names)
    per_crit: Dict[str, List[dict]] = {}
    for c in at:
        per_crit.setdefault(str(c.get("criterion")), []).append(c["layer_keep_fraction"])
    mode = ident[2]
    width = min(max(FIGSIZE[0], 2.0 + 0.16 * len(names)), 24.0) + 1.4  # + the legend
    with matplotlib.rc_context(STYLE):
        fig = _figure((width, FIGSIZE[1] + 0.6))
        ax = fig.add_subplot()
        for crit, fractions in per_crit.items():
            xs, ys, es = [], [], []
            for i, name in enumerate(names):
                values = [f[name] for f in fractions if _finite(f.get(name))]
                if values:
                    m, s = mean_std(values)
                    xs.append(i)
                    ys.append(m)
                    es.append(s)
            spread = len(fractions) > 1
            ax.errorbar(xs, ys, yerr=es if spread else None, label=crit, capsize=2,
                        linewidth=1.2, markersize=4, elinewidth=0.8, **styles(crit))
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, rotation=90, fontsize=7 if len(names) <= 40 else 6)
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("layer (network order)")
        ax.set_ylabel("fraction of weights kept" if unstructured(mode)
                      else "fraction of output channels kept")
        what = "density" if unstructured(mode) else "MACs"
        ax.set_title(_title(ident, f"channels kept per layer at {what} target {chosen:g}"))
        # Outside the axes: the lines fill the whole plot, so any place inside hides some.
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return chosen, fig


def latency_figures(rows: List[dict]) -> Dict[str, Figure]:
    """Latency vs MACs from bench/latency.py rows: one figure per device, one panel per batch
    size; a marker per pruned variant (shape and colour by criterion), dense as a black star,
    and the dotted line latency ∝ MACs through the dense point for reference."""
    figures = {}
    devices: Dict[str, List[dict]] = {}
    for r in rows:
        if _finite(r.get("median_ms")) and _finite(r.get("macs")):
            devices.setdefault(str(r["device"]), []).append(r)
    styles = Styles(criteria_order(r for r in rows if not _is_dense(r)))
    for device, drows in devices.items():
        batches = sorted({int(r["batch_size"]) for r in drows})
        first = drows[0]
        where = first.get("device_name") or device
        run = " / ".join(str(first[k]) for k in ("model", "dataset") if first.get(k))
        with matplotlib.rc_context(STYLE):
            fig = _figure((FIGSIZE[0] if len(batches) == 1 else 4.6 * len(batches), FIGSIZE[1]))
            axes = fig.subplots(1, len(batches), squeeze=False)[0]
            for ax, batch in zip(axes, batches):
                here = [r for r in drows if int(r["batch_size"]) == batch]
                dense = [r for r in here if _is_dense(r)]
                for crit in criteria_order(r for r in here if not _is_dense(r)):
                    pts = sorted((r for r in here if not _is_dense(r)
                                  and str(r.get("criterion")) == crit), key=lambda r: r["macs"])
                    ax.plot([r["macs"] / 1e6 for r in pts], [r["median_ms"] for r in pts],
                            linestyle="none", markersize=6, label=crit, **styles(crit))
                if dense:
                    d = dense[0]
                    ax.plot([d["macs"] / 1e6], [d["median_ms"]], linestyle="none", marker="*",
                            markersize=13, color="black", label="dense")
                    xs = [r["macs"] / 1e6 for r in here]
                    lo = min(xs)
                    ax.plot([lo, d["macs"] / 1e6], [d["median_ms"] * lo * 1e6 / d["macs"],
                                                    d["median_ms"]],
                            linestyle=":", color="0.4", linewidth=1, label="∝ MACs (from dense)")
                ax.set_title(f"batch {batch}")
                ax.set_xlabel("MACs per image (M)")
                ax.set_ylabel("latency per batch (ms)")
                ax.set_ylim(bottom=0)
            axes[-1].legend(loc="best")
            fig.suptitle(f"{run + ': ' if run else ''}inference latency on {where}")
        figures[f"latency_{_safe(device)}"] = fig
    return figures


def _is_dense(r: dict) -> bool:
    return r.get("variant") == "dense"


def _safe(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))


def build_figures(rows: List[dict], latency: Optional[List[dict]] = None,
                  layers_target: Optional[float] = None,
                  say: Optional[Say] = print) -> Dict[str, Figure]:
    """{file stem: Figure} of a grid's cell records (and latency rows); notes for what is left
    out. With several (model, dataset, mode) runs in one grid, stems get the run as a suffix."""
    figures: Dict[str, Figure] = {}
    note = say or (lambda _: None)
    done = finished(rows, say)
    styles = Styles(criteria_order(rows))
    runs = by_run(done)
    if not runs:
        note("note: no finished cells; no accuracy, loss or layer figures")
    for ident, cells in runs.items():
        suffix = "" if len(runs) == 1 else "_" + "_".join(_safe(p) for p in ident)
        for stage in ("finetuned", "pruned"):
            fig = accuracy_figure(cells, stage, ident, styles)
            if fig is None:
                note(f"note: no test_acc_{stage} values; accuracy_{stage}{suffix} skipped")
            else:
                figures[f"accuracy_{stage}{suffix}"] = fig
        fig = loss_figure(cells, ident, styles)
        if fig is None:
            note(f"note: no test_loss_pruned values; loss_pruned{suffix} skipped")
        else:
            figures[f"loss_pruned{suffix}"] = fig
        chosen, fig = layers_figure(cells, ident, styles, layers_target, say)
        if fig is None:
            note(f"note: no layer_keep_fraction records; layers{suffix} skipped")
        else:
            figures[f"layers_{chosen:g}{suffix}"] = fig
    if latency:
        figures.update(latency_figures(latency))
    else:
        note("note: no latency measurements (bench/latency.py --json); latency figure skipped")
    return figures


def save_figure(fig: Figure, stem: Path) -> List[Path]:
    """`stem`.png and `stem`.svg, each written atomically."""
    paths = []
    for ext in FORMATS:
        path = stem.with_name(f"{stem.name}.{ext}")
        _atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext, dpi=DPI))
        paths.append(path)
    return paths


def make_plots(grid_dir, latency=None, layers_target: Optional[float] = None,
               say: Optional[Say] = print) -> List[Path]:
    """Every figure of a grid into `<grid_dir>/plots/` (PNG and SVG); the paths written.
    `latency`: bench/latency.py's JSON (default `<grid_dir>/latency.json` when it exists)."""
    grid = Path(grid_dir)
    rows = load_rows(grid)
    if latency is None and (grid / "latency.json").is_file():
        latency = grid / "latency.json"
    lat_rows = load_latency(latency) if latency is not None else None
    figures = build_figures(rows, lat_rows, layers_target, say)
    out = grid / "plots"
    paths: List[Path] = []
    for name, fig in figures.items():
        paths += save_figure(fig, out / name)
    return paths


# ----------------------------------------------------------------------------- table

def _pm(values: Sequence[float], digits: int = 2) -> str:
    if not values:
        return "—"
    m, s = mean_std(values)
    return f"{m:.{digits}f}" if len(values) == 1 else f"{m:.{digits}f} ± {s:.{digits}f}"


def _reduction(cells: List[dict], *keys: str) -> List[float]:
    """% removed (100 (1 - ratio)) from the first of `keys` a cell has."""
    out = []
    for c in cells:
        ratio = next((c[k] for k in keys if _finite(c.get(k))), None)
        if ratio is not None:
            out.append(100.0 * (1.0 - ratio))
    return out


def summary_table(rows: List[dict]) -> str:
    """Markdown table in the shape of the EigenDamage paper's Table 1: the dense accuracy first,
    then one row per (target, criterion), targets grouped from the least to the most pruned;
    mean ± sample std over the seeds that finished (failed cells are counted apart)."""
    sections = []
    groups = by_run(rows)
    for ident, cells in groups.items():
        mode = ident[2]
        done = [c for c in cells if c.get("status", "done") == "done"]
        kept = "density" if unstructured(mode) else "MACs kept"
        lines = [] if len(groups) == 1 else [f"**{' / '.join(ident)}**", ""]
        lines += [f"| criterion | target ({kept}) | test acc. fine-tuned (%) | test acc. pruned (%) "
                  "| weights pruned (%) | MACs pruned (%) | seeds |",
                  "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
        dense: Dict[object, float] = {}
        for c in done:
            if _finite(c.get("test_acc_dense")):
                dense.setdefault(c.get("seed"), float(c["test_acc_dense"]))
        lines.append(f"| dense | — | {_pm(list(dense.values()))} | — | — | — | {len(dense)} |")
        targets = sorted({_tkey(c["target"]) for c in cells if _finite(c.get("target"))},
                         reverse=True)
        for t in targets:
            for crit in criteria_order(cells):
                here = [c for c in cells if str(c.get("criterion")) == crit
                        and _finite(c.get("target")) and _tkey(c["target"]) == t]
                if not here:
                    continue
                ok = [c for c in here if c.get("status", "done") == "done"]
                failed = sum(c.get("status") == "failed" for c in here)
                unrun = sum(c.get("status") == "not run" for c in here)
                acc_ft = [c["test_acc_finetuned"] for c in ok if _finite(c.get("test_acc_finetuned"))]
                acc_pr = [c["test_acc_pruned"] for c in ok if _finite(c.get("test_acc_pruned"))]
                weights = _reduction(ok, "achieved_params_ratio", "achieved_density")
                macs = _reduction(ok, "achieved_ops_ratio")
                seeds = f"{len(ok)}" + (f" (+{failed} failed)" if failed else "") \
                    + (f" (+{unrun} not run)" if unrun else "")
                lines.append(f"| {crit} | {t:g} | {_pm(acc_ft)} | {_pm(acc_pr)} | {_pm(weights)} "
                             f"| {_pm(macs)} | {seeds} |")
        sections.append("\n".join(lines))
    return "\n\n".join(sections) + "\n"


# ----------------------------------------------------------------------------- command line

def main(argv=None) -> int:
    from utils import cli

    p = cli.parser("Figures (PNG + SVG) and the summary table of a pruning grid's results.")
    p.add_argument("grid_dir", help="folder with the grid runner's results.json (or results.csv)")
    p.add_argument("--latency", default=None,
                   help="bench/latency.py --json file (default: <grid_dir>/latency.json if present)")
    p.add_argument("--layers_target", type=float, default=None,
                   help="target of the per-layer figure (default: the smallest present)")
    args = p.parse_args(argv)
    paths = make_plots(args.grid_dir, args.latency, args.layers_target)
    print()
    print(summary_table(load_rows(args.grid_dir)))
    print(f"{len(paths)} files written to {Path(args.grid_dir) / 'plots'}")
    return 0


if __name__ == "__main__":
    from utils.cli import run_main
    run_main(main)
