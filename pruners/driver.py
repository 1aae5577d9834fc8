"""The FLOPs-target driver: remove the least important channels in small global steps.

Each step re-estimates importance on the current (already pruned) network, folds the scores into
torch-pruning groups, ranks all channels of all groups together, and removes the lowest ones until
the step's MACs budget is spent. Budgets follow an exponential schedule: step k aims at
target ** (k / iterative_steps) of the starting MACs, so early steps are large and late ones fine.
The loop stops as soon as the measured MACs ratio is at or below the target; when no channel can be
removed any more (every layer at its cap) it raises `TargetUnreachable` with the ratio it reached.

Attention: `prune_to_target` first replaces every nn.MultiheadAttention by an equivalent
SplitAttention (models/attention.py), in place. torch-pruning then prunes only the hidden
(embedding) dims of attention (q/k/v input columns, out_proj output rows; the q/k/v projections
are ignored roots, so their internal dims never enter a group), and the internal q/k dims, v dims
or whole heads (pruners/attention_units.py) are ranked in the same global list, against the same
MACs budget, as the channels of the groups.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch_pruning as tp
from tqdm.auto import tqdm

from models.attention import convert_attention, refresh_width_attributes
from utils.distributed import check_same_model
from utils.flops import count_macs, count_params

from .attention_units import AttentionSlot, attention_projections, attention_slots
from .group_scores import ScoreFolder
from .registry import DEFAULT_SCORE_MODE, Batch, check_score_mode, get_method


class PruningError(ValueError):
    """A pruning request that cannot be met; the message is one line for the user."""


class TargetUnreachable(PruningError):
    pass


@dataclass
class PruneSettings:
    target_ops_ratio: float
    iterative_steps: int = 16
    iters_per_step: int = 10
    max_pruning_ratio: float = 0.95
    normalizer: str = "max"
    multivariable: bool = True
    method_options: dict = field(default_factory=dict)
    max_steps_factor: int = 4  # hard stop: iterative_steps * this many steps
    prune_heads: bool = False  # attention: remove whole heads instead of q/k and v dims
    score_mode: str = DEFAULT_SCORE_MODE  # network mode while scoring: train or eval

    def validate(self):
        if not 0.0 < self.target_ops_ratio <= 1.0:
            raise PruningError(f"ops ratio {self.target_ops_ratio} is out of range; "
                               "give the fraction of MACs to keep, in (0, 1]")
        if not 0.0 < self.max_pruning_ratio < 1.0:
            raise PruningError(f"--max_pruning_ratio {self.max_pruning_ratio} is out of range; "
                               "use a value in (0, 1)")
        check_score_mode(self.score_mode)
        if self.iterative_steps < 1 or self.iters_per_step < 1:
            raise PruningError("--iterative_steps and --iters_per_step must be at least 1")


@dataclass
class PruneReport:
    macs_before: int
    macs_after: int
    params_before: int
    params_after: int
    reference_macs: int
    steps: int
    seconds_estimating: float
    seconds_pruning: float

    @property
    def ops_ratio(self) -> float:
        return self.macs_after / self.reference_macs


def channel_widths(model: nn.Module) -> Dict[str, Dict[str, int]]:
    """{module name: {'out': n, 'in': n}} for conv / linear layers: the caps are relative to these."""
    widths = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            widths[name] = {"out": m.out_channels, "in": m.in_channels}
        elif isinstance(m, nn.Linear):
            widths[name] = {"out": m.out_features, "in": m.in_features}
    return widths


def _layer_macs(model: nn.Module, example_inputs: torch.Tensor) -> Dict[nn.Module, float]:
    """MACs of each conv / linear for one input: the cost model that sizes each step."""
    macs: Dict[nn.Module, float] = {}
    batch = example_inputs.shape[0]

    def hook(m, inp, out):
        if isinstance(m, nn.modules.conv._ConvNd):
            k = m.weight[0].numel()  # in_channels/groups * kernel area
            macs[m] = macs.get(m, 0.0) + out.numel() / batch * k
        else:
            macs[m] = macs.get(m, 0.0) + out.numel() / batch * m.in_features

    handles = [m.register_forward_hook(hook) for m in model.modules()
               if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(example_inputs)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return macs


def _channel_cost(group, layer_macs, DG) -> float:
    """Approximate MACs removed with one channel of this group."""
    cost = 0.0
    for dep, _ in group:
        m = dep.target.module
        if m not in layer_macs:
            continue
        if DG.is_out_channel_pruning_fn(dep.handler):
            cost += layer_macs[m] / max(DG.get_out_channels(m) or 1, 1)
        elif DG.is_in_channel_pruning_fn(dep.handler):
            cost += layer_macs[m] / max(DG.get_in_channels(m) or 1, 1)
    return cost


def free_parameters(model: nn.Module) -> List[tuple]:
    """(parameter, channel axis) of parameters used directly in forward, outside any layer
    torch-pruning knows (ViT class token (1, 1, D) and position embedding (1, tokens, D)):
    torch-pruning's "unwrapped parameters". The axis is the last one longer than 1, stated
    explicitly so the graph does not have to guess (and warn)."""
    found = []
    for module in model.modules():
        if tp.ops.module2type(module) != tp.ops.OPTYPE.ELEMENTWISE:
            continue
        for p in module.parameters(recurse=False):
            axes = [i for i, size in enumerate(p.shape) if size > 1]
            if axes:
                found.append((p, axes[-1]))
    return found


class StructuredPruner:
    """Holds the dependency graph of one model and removes channels from it step by step."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, ignored_layers: List[nn.Module],
                 original_widths: Optional[Dict[str, Dict[str, int]]] = None,
                 prune_heads: bool = False):
        """`model` must already be converted (convert_attention) if it has attention layers."""
        self.model = model
        self.example_inputs = example_inputs
        # Internal attention dims are pruned by attention_units, never through torch-pruning groups.
        self.ignored_layers = list(ignored_layers) + attention_projections(model)
        self.prune_heads = prune_heads
        self.original_widths = original_widths or channel_widths(model)
        self.module_names = {m: n for n, m in model.named_modules()}
        was_training = model.training
        model.eval()
        self.DG = tp.DependencyGraph().build_dependency(
            model, example_inputs=example_inputs, unwrapped_parameters=free_parameters(model))
        model.train(was_training)

    def groups(self):
        return list(self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                           root_module_types=[nn.modules.conv._ConvNd, nn.Linear]))

    def _floor(self, group, cap: float) -> int:
        """The fewest channels this group may keep (every layer keeps >= (1-cap) of its original)."""
        floor = 1
        for dep, _ in group:
            m = dep.target.module
            name = self.module_names.get(m)
            if name not in self.original_widths:
                continue
            side = "out" if self.DG.is_out_channel_pruning_fn(dep.handler) else "in"
            floor = max(floor, math.ceil(self.original_widths[name][side] * (1 - cap)))
        return floor

    def plan_step(self, folder: ScoreFolder, budget_macs: float, cap: float):
        """Choose channels to remove: globally lowest scores first until `budget_macs` is spent.

        Returns a list of (root module, handler, channel indices) for torch-pruning groups and
        (AttentionSlot, count) for attention units."""
        layer_macs = _layer_macs(self.model, self.example_inputs[:1])
        candidates = []  # (score, info id, channel / unit index)
        info = []  # (group or AttentionSlot, removable, MACs per channel / unit)
        for group in self.groups():
            scores = folder(group)
            if scores is None:
                continue
            n = len(scores)
            removable = n - self._floor(group, cap)
            info.append((group, removable, _channel_cost(group, layer_macs, self.DG)))
            if removable <= 0:
                continue
            for c in range(n):
                candidates.append((float(scores[c]), len(info) - 1, c))
        for slot in attention_slots(self.model, folder, layer_macs, cap, self.prune_heads):
            info.append((slot, slot.removable, slot.cost))
            # Units in removal order; their scores never decrease, so the stable sort keeps it.
            candidates.extend((float(s), len(info) - 1, r) for r, s in enumerate(slot.unit_scores))
        self.scored_units = len(candidates) + sum(1 for it in info if it[1] <= 0)
        candidates.sort(key=lambda t: t[0])
        chosen: Dict[int, List[int]] = {}
        spent = 0.0
        for score, gi, c in candidates:
            if spent >= budget_macs:
                break
            group, removable, cost = info[gi]
            picked = chosen.setdefault(gi, [])
            if len(picked) >= removable:
                continue
            picked.append(c)
            spent += cost
        plan = []
        for gi, idxs in chosen.items():
            group = info[gi][0]
            if isinstance(group, AttentionSlot):
                plan.append((group, len(idxs)))
                continue
            root = group[0].dep
            plan.append((root.target.module, root.handler, sorted(idxs)))
        return plan

    def apply(self, plan, compensate: Optional[Callable] = None, state: Optional[dict] = None):
        channel_plan = [item for item in plan if not isinstance(item[0], AttentionSlot)]
        attention_plan = [item for item in plan if isinstance(item[0], AttentionSlot)]
        if compensate is not None:
            outputs = {}
            for slot, count in attention_plan:
                for layer, rows in slot.removed_rows(count).items():
                    outputs.setdefault(layer, set()).update(rows)
            for module, handler, idxs in channel_plan:
                group = self.DG.get_pruning_group(module, handler, idxs)
                for dep, layer_idxs in group:
                    if self.DG.is_out_channel_pruning_fn(dep.handler) and isinstance(
                            dep.target.module, (nn.modules.conv._ConvNd, nn.Linear)):
                        outputs.setdefault(dep.target.module, set()).update(int(i) for i in layer_idxs)
            compensate(self.model, {m: sorted(v) for m, v in outputs.items()}, state or {})
        removed = 0
        # Internal attention dims and hidden channels are disjoint index sets: order is free.
        for slot, count in attention_plan:
            removed += slot.remove(count)
        for module, handler, idxs in channel_plan:
            group = self.DG.get_pruning_group(module, handler, idxs)
            if self.DG.check_pruning_group(group):
                group.prune()
                removed += len(idxs)
        refresh_width_attributes(self.model)
        return removed


def prune_to_target(model: nn.Module, method_name: str, batches: Callable[[int], Iterable[Batch]],
                    loss_fn: Callable, example_inputs: torch.Tensor, settings: PruneSettings,
                    ignored_layers: List[nn.Module], reference_macs: Optional[int] = None,
                    original_widths: Optional[Dict[str, Dict[str, int]]] = None,
                    progress: bool = True,
                    recalibrate: Optional[Callable[[nn.Module], None]] = None) -> PruneReport:
    """Prune `model` in place until its MACs are at most target * reference_macs.

    batches(n) must return an iterable of n fresh (inputs, targets) batches.
    reference_macs: the dense network's MACs (default: the model's own MACs now); the iterative
    script passes the dense figure so every ratio is relative to the original network.
    recalibrate(model), when given, runs after every step (BatchNorm statistics re-estimated), so
    the next step scores a network whose eval-mode behaviour is not distorted by stale statistics.
    Every nn.MultiheadAttention is first replaced in place by an equivalent SplitAttention
    (same outputs), whose q/k dims, v dims or heads (settings.prune_heads) can then be pruned.
    """
    settings.validate()
    convert_attention(model)
    method = get_method(method_name)
    macs_before = count_macs(model, example_inputs[:1])
    params_before = count_params(model)
    reference = reference_macs or macs_before
    target_macs = settings.target_ops_ratio * reference
    pruner = StructuredPruner(model, example_inputs[:1], ignored_layers, original_widths,
                              prune_heads=settings.prune_heads)
    t_est = t_prune = 0.0
    steps = 0
    macs = macs_before
    bar = tqdm(total=settings.iterative_steps, desc=f"pruning ({method_name})", disable=not progress,
               unit="step")
    max_steps = settings.iterative_steps * settings.max_steps_factor
    while macs > target_macs:
        if steps >= max_steps:
            raise TargetUnreachable(
                f"stopped after {steps} pruning steps at MACs ratio {macs / reference:.4f} above the "
                f"target {settings.target_ops_ratio}; raise --iterative_steps or --max_pruning_ratio")
        # Exponential schedule, relative to where this run started.
        k = min(steps + 1, settings.iterative_steps)
        goal = max(target_macs, macs_before * (target_macs / macs_before) ** (k / settings.iterative_steps))
        budget = macs - goal
        t0 = time.perf_counter()
        scores = method.score(model, batches(settings.iters_per_step) if method.needs_data else [],
                              loss_fn, settings.score_mode, **settings.method_options)
        folder = ScoreFolder(model, scores, in_channels=method.in_channels,
                             norm_layers=method.norm_layers, multivariable=settings.multivariable,
                             normalizer=settings.normalizer, finalize=method.finalize)
        t1 = time.perf_counter()
        plan = pruner.plan_step(folder, budget, settings.max_pruning_ratio)
        removed = pruner.apply(plan, method.compensate, method.state) if plan else 0
        if removed and recalibrate is not None:
            recalibrate(model)
        steps += 1
        check_same_model(model, f"pruning step {steps}")  # torchrun: all processes agree
        new_macs = count_macs(model, example_inputs[:1])
        t2 = time.perf_counter()
        t_est += t1 - t0
        t_prune += t2 - t1
        if removed == 0 or new_macs >= macs:
            bar.close()
            if pruner.scored_units == 0:
                raise TargetUnreachable(
                    f"{method_name} gave no non-zero importance score to any prunable channel "
                    "(untrained or zero-initialised layers?); train the network first or choose "
                    "another --importance_type")
            raise TargetUnreachable(
                f"FLOPs target {settings.target_ops_ratio} cannot be reached: every layer is at its "
                f"cap, stopped at MACs ratio {new_macs / reference:.4f}; raise --max_pruning_ratio "
                f"(now {settings.max_pruning_ratio}) or ask for a larger ratio")
        macs = new_macs
        bar.update(1 if steps <= settings.iterative_steps else 0)
        bar.set_postfix(ops_ratio=f"{macs / reference:.3f}")
    bar.close()
    return PruneReport(macs_before, macs, params_before, count_params(model), reference, steps,
                       t_est, t_prune)
