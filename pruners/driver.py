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

Layers torch-pruning cannot handle are left alone, never fatal: the run goes on with every other
group, and each such layer is named once on stderr and listed in `PruneReport.left_alone`.
Their channels meet a graph node whose channel mapping torch-pruning does not know:
* a reshape whose index mapping fails (ShuffleNet's channel shuffle);
* an operation that uses a parameter outside any layer torch-pruning traces (Swin's window
  attention calls F.linear on its qkv / proj weights), whose width would go stale;
and groups rooted at attention-internal projections (outputs reshaped into heads: Swin's qkv,
MaxViT's to_qkv, Swin v2's position-bias MLP) are never offered. Grouped convolutions are pruned in
units of one channel offset in every group, so every group keeps the same width.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set

import torch
import torch.nn as nn
import torch_pruning as tp
from torch.overrides import TorchFunctionMode
from tqdm.auto import tqdm

from models.attention import convert_attention, refresh_width_attributes
from utils.distributed import check_same_model
from utils.flops import count_macs, count_params

from .attention_units import AttentionSlot, attention_projections, attention_slots
from .group_scores import ScoreFolder
from .limits import min_kept
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
    left_alone: Dict[str, str] = field(default_factory=dict)  # layer name -> why

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


# Attribute names under which attention modules keep their head count.
_HEAD_ATTRIBUTES = ("num_heads", "n_heads")
# Output projections of attention modules: their outputs are the hidden (residual) width.
_OUTPUT_PROJECTIONS = ("proj", "out_proj", "merge", "o_proj")


def attention_internal_layers(model: nn.Module) -> List[nn.Module]:
    """Layers inside attention modules (other than SplitAttention) whose outputs are reshaped into
    heads or per-head biases, so torch-pruning's flat channel indices would not match: every
    conv / linear of the innermost modules with a head-count attribute except their output
    projection."""
    from models.attention import SplitAttention
    def has_heads(module):
        return any(isinstance(getattr(module, a, None), int) for a in _HEAD_ATTRIBUTES)

    found = []
    for module in model.modules():
        if any(isinstance(m, (SplitAttention, nn.MultiheadAttention)) for m in module.modules()):
            continue  # handled by attention_units (or a block around such an attention)
        # the innermost module with a head count: a block around it keeps its MLP prunable
        if not has_heads(module) or any(has_heads(m) for m in module.modules() if m is not module):
            continue
        output = next((getattr(module, n) for n in _OUTPUT_PROJECTIONS
                       if isinstance(getattr(module, n, None), nn.Module)), None)
        found.extend(m for m in module.modules()
                     if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)) and m is not output)
    return found


_MAPPING_UPDATES = ("update_concat_index_mapping", "update_split_index_mapping",
                    "update_reshape_index_mapping", "update_unbind_index_mapping",
                    "update_expand_index_mapping", "update_slice_index_mapping")


@contextlib.contextmanager
def _tolerant_index_mapping(failed: List):
    """While building a graph, a node whose channel index mapping torch-pruning cannot work out
    (it raises) is recorded in `failed` instead of aborting the whole build."""
    module = tp.dependency.index_mapping
    originals = {name: getattr(module, name) for name in _MAPPING_UPDATES if hasattr(module, name)}

    def tolerant(update):
        def run(graph, node):
            try:
                update(graph, node)
            except Exception as err:  # noqa: BLE001 - any failure means "mapping unknown"
                failed.append((node, f"{type(err).__name__}: {err}"))
        return run

    for name, update in originals.items():
        setattr(module, name, tolerant(update))
    try:
        yield
    finally:
        for name, update in originals.items():
            setattr(module, name, update)


def _untracked_parameter_nodes(DG, model: nn.Module, unwrapped) -> Dict[object, str]:
    """Graph nodes of plain operations that consume a parameter torch-pruning does not track
    (e.g. F.linear(x, self.qkv.weight) inside Swin's attention): pruning through them would leave
    that parameter's width stale. Returns {node: parameter name}."""
    known = {id(p) for p, _ in unwrapped}
    for module in DG.module2node:
        if isinstance(module, nn.Module):
            known.update(id(p) for p in module.parameters(recurse=False))
    names = {id(p): n for n, p in model.named_parameters()}
    found = {}
    for module, node in DG.module2node.items():
        if not type(module).__module__.startswith("torch_pruning"):
            continue  # a layer or an unwrapped parameter, not a plain operation
        for fn, _ in getattr(node.grad_fn, "next_functions", ()):
            variable = getattr(fn, "variable", None)
            if isinstance(variable, nn.Parameter) and id(variable) in names and id(variable) not in known:
                found[node] = names[id(variable)]
    return found


def _reshape_chain(node) -> List:
    """`node` and the reshapes it reaches through plain element-wise operations (a channel shuffle
    is view -> transpose -> view: when the first cannot be mapped, the second is no better)."""
    chain, stack = [node], list(node.outputs)
    while stack:
        n = stack.pop()
        if n in chain or n.type not in (tp.ops.OPTYPE.ELEMENTWISE, tp.ops.OPTYPE.RESHAPE):
            continue
        if isinstance(n.module, nn.Module) and not type(n.module).__module__.startswith("torch_pruning"):
            continue  # a layer (an activation module is element-wise too): the chain ends there
        chain.append(n)
        stack.extend(n.outputs)
    return [n for n in chain if n.type == tp.ops.OPTYPE.RESHAPE]


class _ShapeRecorder(TorchFunctionMode):
    """Records (input shape, output shape) of every operation by its output's grad_fn, while
    torch-pruning traces the model: its reshape nodes carry no output shape of their own."""

    def __init__(self):
        super().__init__()
        self.shapes = {}

    def __torch_function__(self, func, types_, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.grad_fn is not None and args \
                and isinstance(args[0], torch.Tensor):
            self.shapes[out.grad_fn] = (tuple(args[0].shape), tuple(out.shape))
        return out


def _splits_channels(DG, node, shapes) -> bool:
    """Whether reshape `node` cuts its input's channel axis into pieces (a channel shuffle's
    view(b, groups, c / groups, h, w), a projection's split into heads), which torch-pruning's
    flat index mapping cannot follow. Kept: flattening (n, c, h, w) -> (n, c*h*w) or
    (n, c, h*w), and window partitions that keep the channel axis whole."""
    if node.grad_fn not in shapes:
        return False
    before, after = shapes[node.grad_fn]
    depth = [0]
    channels = None
    for source in node.inputs:
        channels = tp.dependency.shape_infer.infer_out_channels_recursively(DG, source, depth)
        if channels is not None:
            break
    if not channels or before == after:
        return False
    if channels in after[1:]:
        return False
    return not (len(after) == 2 and after[1] % channels == 0)


class _Cut:
    """An extra index mapping on every dependency into a barrier node: it stops the group there
    (no indices pass) and records that the group reached it."""

    def __init__(self, node, hits: List):
        self.node = node
        self.hits = hits

    def __call__(self, idxs):
        if len(idxs):
            self.hits.append(self.node)
        return []


class _Guard:
    """An extra index mapping on every dependency: a channel index list longer than any layer's
    width can only come from reshape mappings compounding, and a group that follows far more
    dependencies than the graph has can only be going round in circles (Swin v2); the group is
    stopped there and recorded as reaching `node`."""

    def __init__(self, node, limit: int, hits: List, steps: List, max_steps: int):
        self.node = node
        self.limit = limit
        self.hits = hits
        self.steps = steps  # [dependencies followed in the current group]
        self.max_steps = max_steps

    def __call__(self, idxs):
        self.steps[0] += 1
        if len(idxs) > self.limit or self.steps[0] > self.max_steps:
            self.hits.append(self.node)
            return []
        return idxs


class StructuredPruner:
    """Holds the dependency graph of one model and removes channels from it step by step."""

    def __init__(self, model: nn.Module, example_inputs: torch.Tensor, ignored_layers: List[nn.Module],
                 original_widths: Optional[Dict[str, Dict[str, int]]] = None,
                 prune_heads: bool = False):
        """`model` must already be converted (convert_attention) if it has attention layers."""
        self.model = model
        self.example_inputs = example_inputs
        # Internal attention dims are pruned by attention_units, never through torch-pruning groups;
        # those of other attention modules are not pruned at all.
        self.ignored_layers = (list(ignored_layers) + attention_projections(model)
                               + attention_internal_layers(model))
        self.prune_heads = prune_heads
        self.original_widths = original_widths or channel_widths(model)
        self.module_names = {m: n for n, m in model.named_modules()}
        self.left_alone: Dict[str, str] = {}
        self.refused: Set[nn.Module] = set()  # roots whose pruning raised once
        self._build_graph()

    def _build_graph(self):
        model = self.model
        was_training = model.training
        model.eval()
        unwrapped = free_parameters(model)
        failed: List = []
        recorder = _ShapeRecorder()
        try:
            with _tolerant_index_mapping(failed), recorder:
                self.DG = tp.DependencyGraph().build_dependency(
                    model, example_inputs=self.example_inputs, unwrapped_parameters=unwrapped,
                    verbose=False)
        finally:
            model.train(was_training)
        failed += [(node, "it splits the channel axis") for node in self.DG.module2node.values()
                   if node.type == tp.ops.OPTYPE.RESHAPE and node not in dict(failed)
                   and _splits_channels(self.DG, node, recorder.shapes)]
        # Nodes whose channel mapping is unknown: groups through them are left alone.
        self.barriers: Dict[object, str] = {}
        for node, why in failed:
            for reshape in _reshape_chain(node):
                self.barriers[reshape] = f"torch-pruning cannot map its channels through a reshape ({why})"
        # Attention internals other than SplitAttention's: groups reaching them stop there (their
        # head reshapes and position-bias paths make torch-pruning's traversal run away).
        for layer in attention_internal_layers(model):
            if layer in self.DG.module2node:
                self.barriers[self.DG.module2node[layer]] = (
                    f"its channels feed {self.module_names.get(layer)}, an attention projection into "
                    f"heads that torch-pruning cannot follow")
        for node, param in _untracked_parameter_nodes(self.DG, model, unwrapped).items():
            self.barriers[node] = f"its channels reach {param}, used outside any layer torch-pruning traces"
        self._hits: List = []
        self._steps = [0]
        max_steps = 20 * len(self.DG.module2node)
        limit = max([1] + [w for sides in channel_widths(model).values() for w in sides.values()]
                    + [p.numel() for p, _ in unwrapped])
        runaway = "torch-pruning's channel index mapping runs away through reshapes on its path"
        self.hit_reasons = dict(self.barriers)
        for node in self.DG.module2node.values():
            for dep in node.dependencies:
                if dep.target in self.barriers:
                    dep.index_mapping.append(_Cut(dep.target, self._hits))
                else:
                    dep.index_mapping.append(_Guard(dep.target, limit, self._hits, self._steps,
                                                    max_steps))
                    self.hit_reasons.setdefault(dep.target, runaway)
        # Depthwise as the graph saw them (its pruning functions were chosen then); a grouped conv
        # pruned down to one channel per group later stays a grouped conv for this graph.
        self.depthwise = {m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)
                          and m.groups == m.out_channels > 1}

    def _leave_alone(self, group, why: str) -> None:
        """Report (once) the layers whose outputs a group would prune: they stay as they are."""
        self._report([dep.target.module for dep, _ in group
                      if self.DG.is_out_channel_pruning_fn(dep.handler)], why)

    def _report(self, modules, why: str) -> None:
        for module in modules:
            if not isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
                continue  # its normalisation layers etc. follow it
            name = self.module_names.get(module)
            if name is None or name in self.left_alone:
                continue
            self.left_alone[name] = why
            print(f"structured pruning: leaving layer {name} alone: {why}", file=sys.stderr)

    def _all_groups(self):
        """Every group rooted at the output of a prunable conv / linear (as torch-pruning's
        get_all_groups), except that a root whose group torch-pruning cannot even form is left
        alone instead of aborting the listing."""
        ignored = set(self.ignored_layers) | set(self.DG.IGNORED_LAYERS_IN_TRACING)
        visited = set()
        for m in list(self.DG.module2node):
            if m in ignored or m in visited or not isinstance(m, (nn.modules.conv._ConvNd, nn.Linear)):
                continue
            pruner = self.DG.get_pruner_of_module(m)
            if pruner is None or pruner.get_out_channels(m) is None:
                continue
            self._hits.clear()
            self._steps[0] = 0
            try:
                with _tolerant_index_mapping([]):  # the graph re-runs the mappings for every group
                    group = self.DG.get_pruning_group(m, pruner.prune_out_channels,
                                                      list(range(pruner.get_out_channels(m))))
            except Exception as err:  # noqa: BLE001
                visited.add(m)
                self._report([m], f"torch-pruning cannot trace its group ({type(err).__name__}: {err})")
                continue
            outputs = [dep.target.module for dep, _ in group if self.DG.is_out_channel_pruning_fn(dep.handler)]
            visited.update(outputs)
            if self._hits:
                self._leave_alone(group, self.hit_reasons[self._hits[0]])
            elif not any(o in ignored for o in outputs):
                yield group

    def groups(self):
        groups = []
        for group in self._all_groups():
            if group[0].dep.target.module in self.refused:
                continue
            groups.append(group)
        return groups

    def channel_groups(self, group) -> int:
        """Into how many equal blocks the group's channels fall (grouped convolutions: their
        `groups`; 1 otherwise): channels are removed as one offset in every block."""
        counts = [1]
        for dep, _ in group:
            m = dep.target.module
            if not isinstance(m, nn.modules.conv._ConvNd) or m.groups == 1:
                continue
            if m in self.depthwise:
                continue  # input and output channel are pruned together, freely
            counts.append(m.groups)
        return max(counts)

    def _floor(self, group, cap: float) -> int:
        """The fewest channels this group may keep (every layer keeps >= (1-cap) of its original)."""
        floor = 1
        for dep, _ in group:
            m = dep.target.module
            name = self.module_names.get(m)
            if name not in self.original_widths:
                continue
            side = "out" if self.DG.is_out_channel_pruning_fn(dep.handler) else "in"
            floor = max(floor, min_kept(self.original_widths[name][side], cap))
        return floor

    def plan_step(self, folder: ScoreFolder, budget_macs: float, cap: float):
        """Choose channels to remove: globally lowest scores first until `budget_macs` is spent.

        Returns a list of (root module, handler, channel indices) for torch-pruning groups and
        (AttentionSlot, count) for attention units."""
        layer_macs = _layer_macs(self.model, self.example_inputs[:1])
        candidates = []  # (score, info id, unit index)
        info = []  # (group or AttentionSlot, removable units, MACs per unit, blocks)
        for group in self.groups():
            try:
                scores = folder(group)
            except Exception as err:  # noqa: BLE001 - a layer the folding cannot read
                self._leave_alone(group, f"its scores could not be folded ({type(err).__name__}: {err})")
                continue
            if scores is None:
                continue
            n = len(scores)
            blocks = self.channel_groups(group)
            if n % blocks:
                self._leave_alone(group, f"{n} channels do not split into {blocks} equal groups")
                continue
            # One unit = the same channel offset in every block (a single channel when blocks = 1).
            unit_scores = scores.reshape(blocks, -1).mean(0)
            removable = (n - self._floor(group, cap)) // blocks
            info.append((group, removable, _channel_cost(group, layer_macs, self.DG) * blocks, blocks))
            if removable <= 0:
                continue
            # .tolist(): one device-to-host copy per group, not one sync per channel on a GPU
            candidates.extend((s, len(info) - 1, c) for c, s in enumerate(unit_scores.tolist()))
        for slot in attention_slots(self.model, folder, layer_macs, cap, self.prune_heads):
            info.append((slot, slot.removable, slot.cost, 1))
            # Units in removal order; their scores never decrease, so the stable sort keeps it.
            candidates.extend((s, len(info) - 1, r) for r, s in enumerate(slot.unit_scores.tolist()))
        self.scored_units = len(candidates) + sum(1 for it in info if it[1] <= 0)
        candidates.sort(key=lambda t: t[0])
        chosen: Dict[int, List[int]] = {}
        spent = 0.0
        for score, gi, c in candidates:
            if spent >= budget_macs:
                break
            group, removable, cost, _ = info[gi]
            picked = chosen.setdefault(gi, [])
            if len(picked) >= removable:
                continue
            picked.append(c)
            spent += cost
        plan = []
        for gi, units in chosen.items():
            group, _, _, blocks = info[gi]
            if isinstance(group, AttentionSlot):
                plan.append((group, len(units)))
                continue
            width = len(group[0].root_idxs) // blocks
            idxs = sorted(b * width + u for b in range(blocks) for u in units)
            root = group[0].dep
            plan.append((root.target.module, root.handler, idxs))
        return plan

    def apply(self, plan, compensate: Optional[Callable] = None, state: Optional[dict] = None):
        """Remove what `plan_step` chose; returns the number of units removed. `compensate`
        (Kron-OBS's weight update) runs on each unit's layers just before that unit is removed,
        and only then: a group torch-pruning refuses (its check fails, or its surgery raises)
        keeps its weights exactly as they were."""
        channel_plan = [item for item in plan if not isinstance(item[0], AttentionSlot)]
        attention_plan = [item for item in plan if isinstance(item[0], AttentionSlot)]
        removed = 0
        # Internal attention dims and hidden channels are disjoint index sets: order is free. Each
        # layer's outputs belong to one unit, and the OBS update mixes only output rows of its own
        # layer, so updating unit by unit equals one joint update before any removal.
        for slot, count in attention_plan:
            if compensate is not None:
                compensate(self.model, {layer: sorted(rows) for layer, rows
                                        in slot.removed_rows(count).items()}, state or {})
            removed += slot.remove(count)
        for module, handler, idxs in channel_plan:
            with _tolerant_index_mapping([]):
                group = self.DG.get_pruning_group(module, handler, idxs)
            if not self.DG.check_pruning_group(group):
                continue
            saved = {}
            if compensate is not None:
                outputs = self._removed_outputs(group)
                saved = {m: [p.detach().clone() for p in m.parameters(recurse=False)]
                         for m in outputs}
                compensate(self.model, outputs, state or {})
            try:
                group.prune()
            except Exception as err:  # noqa: BLE001 - a layer torch-pruning cannot cut
                _restore(saved)
                self.refused.add(module)
                self._leave_alone(group, f"torch-pruning failed on it ({type(err).__name__}: {err})")
                continue
            removed += len(idxs)
        refresh_width_attributes(self.model)
        return removed

    def _removed_outputs(self, group) -> Dict[nn.Module, List[int]]:
        """{conv / linear layer: its output rows that `group` removes}."""
        outputs: Dict[nn.Module, Set[int]] = {}
        for dep, layer_idxs in group:
            if self.DG.is_out_channel_pruning_fn(dep.handler) and isinstance(
                    dep.target.module, (nn.modules.conv._ConvNd, nn.Linear)):
                outputs.setdefault(dep.target.module, set()).update(int(i) for i in layer_idxs)
        return {m: sorted(v) for m, v in outputs.items()}


def _restore(saved: Dict[nn.Module, List[torch.Tensor]]) -> None:
    """Put back the parameters saved before a compensation whose removal then failed (those a
    partial surgery already reshaped cannot be, and are left as they are)."""
    with torch.no_grad():
        for module, values in saved.items():
            for p, value in zip(module.parameters(recurse=False), values):
                if p.shape == value.shape:
                    p.copy_(value)


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
                       t_est, t_prune, dict(pruner.left_alone))
