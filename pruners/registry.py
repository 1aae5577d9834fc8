"""The table of importance criteria.

Every criterion is a `Method`: a function that turns (model, batches, loss) into per-parameter
scores, plus a few flags telling the structured driver how to fold those scores into channel
scores. The driver, the scripts and `parameter_scores` only ever look criteria up here, so a new
criterion is one `register(...)` call in its own module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, Optional, Tuple

import torch
import torch.nn as nn

from utils.distributed import all_reduce_dict, all_reduce_sum, is_distributed
from utils.log import RunFailure

ScoreDict = Dict[str, torch.Tensor]
Batch = Tuple[torch.Tensor, torch.Tensor]


class CriterionError(ValueError):
    """Bad criterion name or options; the message is meant for the user, one line."""


# The network's mode while it is scored, the same for every criterion: 'train' (BatchNorm on
# batch statistics, dropout active; what the published code does) or 'eval' (running statistics).
SCORE_MODES = ("train", "eval")
DEFAULT_SCORE_MODE = "train"


def check_finite(method: str, scores: ScoreDict) -> None:
    """Refuse NaN/inf scores before anything is removed with them."""
    for name, value in scores.items():
        if not bool(torch.isfinite(value).all()):
            raise RunFailure(f"{method} gave NaN/inf importance scores for {name}, so nothing was "
                             "removed; check the network and data for NaN/inf (a diverged "
                             "training, a too-high learning rate) or use another criterion")


def check_score_mode(score_mode: str) -> None:
    if score_mode not in SCORE_MODES:
        raise CriterionError(f"unknown score mode '{score_mode}'; choose one of: "
                             f"{', '.join(SCORE_MODES)}")


@dataclass
class Method:
    """One importance criterion.

    estimate(model, batches, loss_fn, **options) -> {parameter name: score of that shape}
        Scores are "higher = more important" once folded (the aggregation takes absolute
        values per layer where `absolute` is set). It must leave the model's weights and
        buffers (BatchNorm running statistics included) exactly as it found them.
    finalize: applied to a group's folded channel scores before normalisation (e.g. sqrt).
    in_channels: a channel is also scored by the input slice of the layers it feeds.
    norm_layers: normalisation-layer parameters carry the score (NN Slimming).
    compensate(model, plan, state) is called with {module: output indices to remove} just
        before they are removed (Kron-OBS weight update); `state` is what estimate stored
        in `Method.state`.
    options: the names of keyword options `estimate` understands (for clear errors).
    prune_to_target: set for criteria that do not remove channels but rebuild the network
        (EigenDamage's bottlenecks): prune_to_target(model, batches, loss_fn, example_inputs,
        target_ratio, max_pruning_ratio=..., classifier=..., **options) -> (network, info),
        target_ratio relative to `model`'s own MACs; the structured scripts call it instead of
        the channel driver.

    Under torchrun, `estimate` sees this process's share of the batches; the two places that
    accumulate over batches (`average_batch_scores` here, and the K-FAC statistics) sum over all
    processes, so every process gets the scores of the whole set of batches.
    """

    name: str
    estimate: Callable[..., ScoreDict]
    in_channels: bool = True
    norm_layers: bool = False
    compensate: Optional[Callable[..., None]] = None
    finalize: Optional[Callable[[torch.Tensor], torch.Tensor]] = None
    options: Tuple[str, ...] = ()
    needs_data: bool = True
    description: str = ""
    prune_to_target: Optional[Callable[..., Tuple[nn.Module, dict]]] = None
    prune_options: Tuple[str, ...] = ()  # keyword options of prune_to_target beyond `options`
    state: dict = field(default_factory=dict)

    def score(self, model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
              score_mode: str = DEFAULT_SCORE_MODE, **options) -> ScoreDict:
        """`estimate` with the network in `score_mode` ('train' or 'eval'); every buffer
        (BatchNorm running statistics included) and train/eval flag is restored afterwards.
        Running out of GPU memory is a RunFailure naming the batch size that failed."""
        check_score_mode(score_mode)
        seen = BatchSizes(batches if self.needs_data else [])
        with preserved_state(model), out_of_memory_as_failure(self.name, seen):
            model.train(score_mode == "train")
            scores = self.estimate(model, seen, loss_fn, **options)
        check_finite(self.name, scores)
        return scores


class BatchSizes:
    """The batches, passed through, remembering the size of the last one handed out."""

    def __init__(self, batches: Iterable[Batch]):
        self.batches, self.last = batches, None

    def __iter__(self):
        for batch in self.batches:
            self.last = int(batch[0].shape[0])
            yield batch


def _is_out_of_memory(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or (
        isinstance(err, RuntimeError) and "out of memory" in str(err).lower())


class out_of_memory_as_failure:
    """Context manager: an out-of-memory error while `method` estimates importance becomes one
    line naming the batch size that failed and what to lower (exit 1, not a traceback)."""

    def __init__(self, method: str, sizes: "BatchSizes"):
        self.method, self.sizes = method, sizes

    def __enter__(self):
        return self

    def __exit__(self, kind, err, tb):
        if err is None or not _is_out_of_memory(err):
            return False
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        size = f"batches of {self.sizes.last} images" if self.sizes.last else "its batches"
        raise RunFailure(f"out of memory while {self.method} estimated importance on {size}; lower "
                         "the importance batch size (--importance_batch_size in prune_imagenet.py, "
                         "--batch_size in the other scripts) or use a GPU with more memory") from None


_METHODS: Dict[str, Method] = {}


def register(method: Method) -> Method:
    _METHODS[method.name] = method
    return method


def _load_all() -> None:
    # Importing the criterion modules registers them; done lazily to keep imports cheap. Plain
    # imports: a criterion module that fails to import is a bug to see, not a criterion to hide.
    from . import basic, fastoba, kfac_criteria, oba, slimming  # noqa: F401


def available_methods() -> Tuple[str, ...]:
    _load_all()
    return tuple(sorted(_METHODS))


def get_method(name: str) -> Method:
    _load_all()
    if name not in _METHODS:
        raise CriterionError(
            f"unknown importance type '{name}'; choose one of: {', '.join(available_methods())}")
    return _METHODS[name]


def parameter_scores(method: str, model: nn.Module, batches: Iterable[Batch],
                     criterion: Optional[Callable] = None, score_mode: str = DEFAULT_SCORE_MODE,
                     **options) -> ScoreDict:
    """Per-parameter importance of `model`, averaged over `batches`.

    method: a registered criterion name ("Weight", "Taylor", "OBA", "fastOBA", ...).
    batches: an iterable of (inputs, targets); they are moved to the model's device.
    criterion: the loss, `loss = criterion(model(inputs), targets)` (default cross-entropy).
    score_mode: 'train' (BatchNorm on batch statistics, as the published code) or 'eval'
    (running statistics); the model's own mode and buffers are restored afterwards.
    Returns {name as in model.named_parameters(): tensor of that parameter's shape}; only
    parameters the criterion scores appear.
    """
    spec = get_method(method)
    unknown = sorted(set(options) - set(spec.options))
    if unknown:
        raise CriterionError(
            f"{method} does not take option(s) {', '.join(unknown)}; it takes: "
            f"{', '.join(spec.options) or 'none'}")
    loss_fn = criterion if criterion is not None else nn.CrossEntropyLoss()
    return spec.score(model, batches, loss_fn, score_mode, **options)


def model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    return torch.device("cpu")


def to_device(batch: Batch, device: torch.device) -> Batch:
    x, y = batch
    return x.to(device, non_blocking=True), y.to(device, non_blocking=True)


def average_batch_scores(model: nn.Module, batches: Iterable[Batch],
                         per_batch: Callable[[nn.Module, torch.Tensor, torch.Tensor], ScoreDict]
                         ) -> ScoreDict:
    """Mean over batches of `per_batch(model, x, y)`; the shared loop of most criteria.

    Under torchrun the sums and the batch count are added up over all processes first, so the
    result is the mean over every process's batches (the same on all of them)."""
    device = model_device(model)
    total: ScoreDict = {}
    count = 0
    for batch in batches:
        x, y = to_device(batch, device)
        scores = per_batch(model, x, y)
        for k, v in scores.items():
            v = v.detach()
            total[k] = total[k] + v if k in total else v.clone()
        count += 1
    if is_distributed():
        count = _total_batches(count)
        total = all_reduce_dict(total)
    if count == 0:
        raise CriterionError("no batches were given for importance estimation; "
                             "pass at least one (inputs, targets) batch")
    return {k: v / count for k, v in total.items()}


def _total_batches(count: int) -> int:
    """The batch count over all processes; every process fails together when one has none (its
    score dict would be empty and the all-reduce of the sums would not match)."""
    both = all_reduce_sum(torch.tensor([float(count), float(count == 0)], dtype=torch.float64))
    if both[1] > 0:
        raise CriterionError("a process received no importance batch; start at most as many "
                             "processes as there are batches per step")
    return int(both[0])


class preserved_state:
    """Context manager: restore every buffer (BatchNorm running statistics, counters) and the
    train/eval flag of each module on exit, so importance estimation has no side effects."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self._buffers = {k: b.detach().clone() for k, b in self.model.named_buffers()}
        self._modes = {m: m.training for m in self.model.modules()}
        return self.model

    def __exit__(self, *exc):
        with torch.no_grad():
            for k, b in self.model.named_buffers():
                if k in self._buffers:
                    b.copy_(self._buffers[k])
        for m, mode in self._modes.items():
            m.training = mode
        return False
