"""Argument parsing shared by the scripts, and the error boundary that turns bad input into one line.

The flag names are the public interface (DESIGN.md §1); scripts add only what is theirs.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Callable, List, Optional

import torch

from utils import recipes

_OUR_PACKAGES = ("utils", "models", "pruners")


class UsageError(ValueError):
    """Bad command-line input; one line for the user."""


class _Published:
    """Placeholder default of a flag whose value comes from the published-settings table
    (utils/recipes.py); the parser fills it in for its script before parsing or printing help."""

    def __repr__(self):
        return "PUBLISHED"


PUBLISHED = _Published()


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's default in --help (a help text that already says its default keeps its words)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default" in text or action.default is argparse.SUPPRESS or not action.option_strings:
            return text
        return f"{text} (default: %(default)s)".lstrip()


class _Parser(argparse.ArgumentParser):
    def __init__(self, *a, script: Optional[str] = None, **kw):
        super().__init__(*a, **kw)
        self.script = script

    def error(self, message):  # one line, no usage dump
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def _fill_published(self) -> None:
        for action in self._actions:
            if action.default is PUBLISHED:
                action.default = recipes.default(self.script, action.dest)

    def format_help(self):
        self._fill_published()
        return super().format_help()

    def parse_known_args(self, args=None, namespace=None):
        self._fill_published()
        ns, extra = super().parse_known_args(args, namespace)
        recipes.resolve(ns)  # --recipe's values for the flags not given, milestones in epochs
        return ns, extra


def parser(description: str, script: Optional[str] = None) -> argparse.ArgumentParser:
    """A parser of one of our scripts; `script` picks its row of the published-settings table
    (utils/recipes.py: e.g. "iterative_prune"; None: the one-shot scripts' settings)."""
    return _Parser(description=description, formatter_class=_HelpFormatter, script=script)


def add_common(p: argparse.ArgumentParser, default_model: str = "resnet20",
               default_dataset: str = "digits") -> None:
    """The flags of the CIFAR-style scripts (train_prune.py, iterative_prune.py)."""
    add_loading(add_data_model(p, default_model, default_dataset))
    add_outputs(add_run(p))
    add_settings_recipe(p)
    add_dense_training(p)
    add_finetuning(p)


def add_settings_recipe(p: argparse.ArgumentParser) -> None:
    p.add_argument("--recipe", default=recipes.DEFAULT, choices=sorted(recipes.RECIPES),
                   help="published settings for the training flags not given: oba (the published "
                        "OBA code) or eigendamage (the EigenDamage paper's schedules: 150 dense "
                        "epochs, weight decay 2e-4, lr drops at 1/2 and 3/4 of both phases); "
                        "a flag given always wins")


def add_loading(g) -> None:
    """Loader flags of the pruning scripts (train_imagenet.py names them as torchvision does)."""
    g.add_argument("--batch_size", type=int, default=PUBLISHED,
                   help="images per batch: training, importance estimation, evaluation")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help="images per evaluation batch (default: --batch_size)")
    g.add_argument("--num_workers", type=int, default=0, help="data-loading worker processes")
    g.add_argument("--val_fraction", type=float, default=0.1,
                   help="fraction of the training set held out to pick checkpoints, in [0, 1); "
                        "0: no validation split, the last epoch is kept (digits: its split is "
                        "fixed, and 0 leaves its validation part unused)")


def add_outputs(g) -> None:
    g.add_argument("--output_dir", default=None, help="where results and pruned models go (default: "
                   "outputs/<dataset>_<model>_<importance_type>)")
    g.add_argument("--save_path_prefix", default="checkpoints",
                   help="folder of dense (pretrained) checkpoints: <prefix>/<dataset>_<model>.pth")
    g.add_argument("--pretrained", default=None,
                   help="dense checkpoint to start from (default: the one under --save_path_prefix)")


def add_dense_training(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("dense training")
    g.add_argument("--num_epochs", type=int, default=PUBLISHED,
                   help="epochs of dense training (SGD, multi-step lr); 0: no training")
    g.add_argument("--lr", type=float, default=PUBLISHED, help="initial learning rate")
    g.add_argument("--milestones", type=int, nargs="+", default=PUBLISHED,
                   help="epochs at which the lr drops by --lr_gamma; not given: the recipe's, "
                        "scaled with --num_epochs (oba: 30%%, 50%%, 75%%; eigendamage: 50%%, 75%%)")
    g.add_argument("--lr_gamma", type=float, default=0.1,
                   help="lr factor at every milestone (dense training and fine-tuning)")
    g.add_argument("--momentum", type=float, default=0.9,
                   help="SGD momentum (dense training and fine-tuning)")
    g.add_argument("--weight_decay", type=float, default=PUBLISHED, help="SGD weight decay")
    g.add_argument("--sparsity_l1", type=float, default=0.0,
                   help="L1 penalty on BatchNorm scales while training the dense model (NN Slimming)")
    add_nan_policy(g)


def add_nan_policy(g) -> None:
    g.add_argument("--nan_policy", default="stop", choices=["stop", "skip_batch"],
                   help="a training batch with a NaN/inf loss: stop (naming epoch and step, before "
                        "any weight changes) or skip_batch (no optimiser step for it)")


def add_finetuning(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("fine-tuning after pruning")
    g.add_argument("--sl_num_epochs", type=int, default=PUBLISHED,
                   help="epochs of fine-tuning after pruning; 0: none")
    g.add_argument("--sl_lr", type=float, default=PUBLISHED, help="initial fine-tuning learning rate")
    g.add_argument("--sl_milestones", type=int, nargs="+", default=PUBLISHED,
                   help="fine-tuning epochs at which the lr drops by --lr_gamma; not given: the "
                        "recipe's, scaled with --sl_num_epochs")
    g.add_argument("--sl_weight_decay", type=float, default=PUBLISHED,
                   help="fine-tuning weight decay")


def add_data_model(p: argparse.ArgumentParser, default_model: Optional[str] = "resnet20",
                   default_dataset: str = "digits", model_help: Optional[str] = None,
                   default_weights: Optional[str] = None):
    """--dataset --data_root --download --model --weights --image_size; returns the group to add
    loader flags."""
    g = p.add_argument_group("data and model")
    g.add_argument("--dataset", default=default_dataset,
                   help="digits (embedded), cifar10, cifar100, tiny_imagenet, imagenet")
    g.add_argument("--data_root", default=None, help="dataset folder (default: the one dataset.yaml names)")
    g.add_argument("--download", action=argparse.BooleanOptionalAction, default=False,
                   help="download CIFAR when missing (needs internet)")
    g.add_argument("--model", default=default_model,
                   help=model_help or "network name (see models.available_models)")
    g.add_argument("--weights", default=default_weights,
                   help="torchvision weights name (read from the torch hub cache) or a local file; "
                        "a network given weights is pruned as it is, never re-trained")
    g.add_argument("--image_size", type=int, default=None,
                   help="imagenet: crop size (default: 224; train_imagenet.py: the model file's); "
                        "small values for quick CPU runs")
    return g


def add_run(p: argparse.ArgumentParser):
    """--device --seed --deterministic --resume --tensorboard --progress; returns the group."""
    g = p.add_argument_group("run")
    g.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:N "
                   "(under torchrun every process uses GPU LOCAL_RANK)")
    g.add_argument("--seed", type=int, default=0, help="seed of every random stream")
    g.add_argument("--deterministic", action=argparse.BooleanOptionalAction, default=False,
                   help="reproducible runs on CUDA as far as PyTorch allows (deterministic kernels, "
                        "no cuDNN autotuning, CUBLAS_WORKSPACE_CONFIG=:4096:8); often slower. "
                        "CPU runs are deterministic for a --seed without it")
    g.add_argument("--resume", action=argparse.BooleanOptionalAction, default=False,
                   help="continue an interrupted run from its last complete checkpoint (an error when "
                        "there is nothing to resume)")
    g.add_argument("--tensorboard", action=argparse.BooleanOptionalAction, default=True,
                   help="TensorBoard scalars next to the results")
    g.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                   help="tqdm progress bars")
    return g


def add_recipe(p: argparse.ArgumentParser, epochs: int = 100, batch_size: int = 64,
               lr: float = 0.001, weight_decay: float = 1e-4,
               milestones: Optional[List[int]] = (30, 60, 80), auto_augment: str = "ta_wide",
               workers: int = 8) -> None:
    """Training-recipe flags named as in torchvision's references/classification/train.py
    (defaults: the published OBA ImageNet fine-tuning recipe); `train_config(args)` turns them
    into a `utils.engine.TrainConfig`."""
    g = p.add_argument_group("training recipe (torchvision reference names)")
    g.add_argument("--epochs", type=int, default=epochs, help="fine-tuning epochs")
    g.add_argument("-b", "--batch-size", dest="batch_size", type=int, default=batch_size,
                   help="images per process per step (global batch = this x processes)")
    g.add_argument("--eval-batch-size", dest="eval_batch_size", type=int, default=None,
                   help="per process; default: --batch-size")
    g.add_argument("-j", "--workers", dest="workers", type=int, default=workers,
                   help="data-loading worker processes per training process")
    g.add_argument("--opt", default="sgd", choices=["sgd", "adamw"], help="optimiser")
    g.add_argument("--lr", type=float, default=lr, help="initial learning rate")
    g.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    g.add_argument("--wd", "--weight-decay", dest="weight_decay", type=float, default=weight_decay,
                   help="weight decay")
    g.add_argument("--lr-scheduler", dest="lr_scheduler", default="multisteplr",
                   choices=["multisteplr", "steplr", "cosineannealinglr"], help="lr schedule")
    g.add_argument("--lr-milestones", dest="lr_milestones", type=int, nargs="+",
                   default=list(milestones) if milestones else None,
                   help="multisteplr: epochs (after warm-up) at which the lr drops by --lr-gamma")
    g.add_argument("--lr-step-size", dest="lr_step_size", type=int, default=30,
                   help="steplr: epochs between drops by --lr-gamma")
    g.add_argument("--lr-gamma", dest="lr_gamma", type=float, default=0.1,
                   help="lr factor at every drop")
    g.add_argument("--lr-min", dest="lr_min", type=float, default=0.0,
                   help="cosineannealinglr: final lr")
    g.add_argument("--lr-warmup-epochs", dest="lr_warmup_epochs", type=int, default=0,
                   help="warm-up epochs before the schedule")
    g.add_argument("--lr-warmup-method", dest="lr_warmup_method", default="linear",
                   choices=["linear", "constant"], help="warm-up shape")
    g.add_argument("--lr-warmup-decay", dest="lr_warmup_decay", type=float, default=0.01,
                   help="warm-up starts at lr x this")
    g.add_argument("--label-smoothing", dest="label_smoothing", type=float, default=0.0,
                   help="cross-entropy label smoothing")
    g.add_argument("--mixup-alpha", dest="mixup_alpha", type=float, default=0.0,
                   help="MixUp Beta parameter (0: off)")
    g.add_argument("--cutmix-alpha", dest="cutmix_alpha", type=float, default=0.0,
                   help="CutMix Beta parameter (0: off)")
    g.add_argument("--auto-augment", dest="auto_augment", default=auto_augment,
                   help="ta_wide, ra, imagenet, cifar10, svhn or none")
    g.add_argument("--model-ema", dest="model_ema", action=argparse.BooleanOptionalAction,
                   default=False, help="keep an exponential moving average of the weights")
    g.add_argument("--model-ema-steps", dest="model_ema_steps", type=int, default=32,
                   help="iterations between EMA updates")
    g.add_argument("--model-ema-decay", dest="model_ema_decay", type=float, default=0.99998,
                   help="EMA decay per update")
    g.add_argument("--clip-grad-norm", dest="clip_grad_norm", type=float, default=None,
                   help="clip the gradient norm to this (default: no clipping)")
    g.add_argument("--amp", action=argparse.BooleanOptionalAction, default=False,
                   help="CUDA mixed precision (autocast + GradScaler)")
    g.add_argument("--sync-bn", dest="sync_bn", action=argparse.BooleanOptionalAction,
                   default=False, help="synchronise BatchNorm statistics across GPUs (CUDA only)")
    add_nan_policy(g)


def train_config(args, **overrides):
    """The `TrainConfig` of the `add_recipe` flags."""
    from utils.engine import TrainConfig
    kw = dict(epochs=args.epochs, lr=args.lr, milestones=sorted(args.lr_milestones or []),
              gamma=args.lr_gamma, momentum=args.momentum, weight_decay=args.weight_decay,
              optimizer=args.opt, lr_scheduler=args.lr_scheduler, lr_step_size=args.lr_step_size,
              lr_min=args.lr_min, lr_warmup_epochs=args.lr_warmup_epochs,
              lr_warmup_method=args.lr_warmup_method, lr_warmup_decay=args.lr_warmup_decay,
              label_smoothing=args.label_smoothing, mixup_alpha=args.mixup_alpha,
              cutmix_alpha=args.cutmix_alpha, clip_grad_norm=args.clip_grad_norm, amp=args.amp,
              model_ema=args.model_ema, model_ema_steps=args.model_ema_steps,
              model_ema_decay=args.model_ema_decay, nan_policy=args.nan_policy)
    kw.update(overrides)
    return TrainConfig(**kw)


def add_pruning(p: argparse.ArgumentParser, default_importance: str = "OBA") -> None:
    g = p.add_argument_group("pruning")
    g.add_argument("--importance_type", default=default_importance,
                   help="OBA, fastOBA, Weight, Taylor, Random, C-OBD, C-OBS, Kron-OBD, Kron-OBS, "
                        "Eigen, Slim")
    g.add_argument("--iterative_steps", type=int, default=PUBLISHED,
                   help="pruning steps of the exponential schedule to reach a target")
    g.add_argument("--iters_per_step", type=int, default=PUBLISHED,
                   help="batches used to estimate importance at every step")
    g.add_argument("--max_pruning_ratio", type=float, default=PUBLISHED,
                   help="no layer loses more than this fraction of its original channels")
    g.add_argument("--normalizer", default="max",
                   help="per-group score normalisation: max, mean, sum, standardization, none")
    g.add_argument("--multivariable", action=argparse.BooleanOptionalAction, default=True,
                   help="channel score = |sum of its parameters' scores| (removed together); "
                        "--no-multivariable sums absolute per-parameter scores")
    g.add_argument("--score_mode", default="train", choices=["train", "eval"],
                   help="network mode while every criterion scores it: train (BatchNorm on batch "
                        "statistics, as the published code) or eval (running statistics); "
                        "running statistics are never changed by scoring")
    g.add_argument("--bn_recalibration_batches", type=int, default=16,
                   help="after every pruning step, re-estimate BatchNorm running statistics on this "
                        "many training batches (no weight changes); 0 turns it off")
    g = p.add_argument_group("criterion options")
    g.add_argument("--delta", type=float, default=0.0, help="weight of the first-order term g*theta")
    g.add_argument("--upward_delta", type=float, default=1.0,
                   help="OBA (published meaning): a parameter's term from the layers AFTER its "
                        "own, times upward_delta^2 (it scales both perturbations)")
    g.add_argument("--downward_delta", type=float, default=1.0,
                   help="OBA (published meaning): a parameter's term from the layers BEFORE its "
                        "own, times downward_delta^2; it also multiplies parallel terms once")
    g.add_argument("--parallel_delta", type=float, default=1.0,
                   help="OBA: terms of branches multiplied together (Q.K^T, A.V), times "
                        "parallel_delta * downward_delta")
    g.add_argument("--order", type=int, default=2, help="fastOBA: order k of the Taylor term")
    g.add_argument("--fastoba_delta", type=float, default=1.0, help="fastOBA: scale of the k-th term")
    g.add_argument("--fisher_type", default="true", help="K-FAC methods: true or empirical Fisher")
    g.add_argument("--damping", type=float, default=1e-3, help="K-FAC damping")
    g.add_argument("--obs_update", action=argparse.BooleanOptionalAction, default=True,
                   help="Kron-OBS: apply the compensating update to the remaining filters")
    g.add_argument("--depthwise", action=argparse.BooleanOptionalAction, default=False,
                   help="Eigen: depthwise-separable decomposition of the bottleneck core")
    g.add_argument("--cp_rank", type=int, default=None,
                   help="Eigen with --depthwise: rank of the CP decomposition of each core "
                        "(default: the larger of its kept input and output directions)")
    g.add_argument("--prune_heads", action=argparse.BooleanOptionalAction, default=False,
                   help="attention: remove whole heads")


def settings(args) -> dict:
    """Every flag's effective value for the records, JSON-safe: nothing is left out (tuples become
    lists, other objects such as paths their text)."""
    def plain(v):
        if v is None or isinstance(v, (bool, int, float, str)):
            return v
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {str(k): plain(x) for k, x in v.items()}
        return str(v)
    return {k: plain(v) for k, v in vars(args).items()}


def method_options(args, method, names=None) -> dict:
    """The criterion options the chosen method understands (`names`, default its estimate
    options), taken from the parsed flags."""
    names = method.options if names is None else names
    return {name: getattr(args, name) for name in names if hasattr(args, name)}


# Counts every script validates before any work: flag dest -> smallest allowed value.
_AT_LEAST = {"num_epochs": 0, "sl_num_epochs": 0, "epochs": 0, "ft_between_steps": 0,
             "bn_recalibration_batches": 0, "num_workers": 0, "workers": 0,
             "batch_size": 1, "eval_batch_size": 1, "importance_batch_size": 1,
             "iterative_steps": 1, "iters_per_step": 1, "stop_after_epochs": 1,
             "cp_rank": 1}


def parse(p: argparse.ArgumentParser, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """Parse `argv` and refuse counts out of range (negative epochs, zero batch size or steps,
    --val_fraction outside [0, 1)) with one line naming the flag, before anything runs."""
    args = p.parse_args(argv)
    flags = {a.dest: max(a.option_strings, key=len) for a in p._actions if a.option_strings}
    for dest, least in _AT_LEAST.items():
        value = getattr(args, dest, None)
        if dest in flags and value is not None and value < least:
            raise UsageError(f"{flags[dest]} must be at least {least}, got {value}; pass a value "
                             f">= {least}")
    vf = getattr(args, "val_fraction", None)
    if vf is not None and not 0.0 <= vf < 1.0:  # NaN fails the comparison too
        raise UsageError(f"--val_fraction must be in [0, 1), got {vf}; use e.g. 0.1, or 0 for no "
                         "validation split (the last epoch is kept)")
    return args


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device '{name}' is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name} asked for CUDA but no GPU is available; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: there are only {torch.cuda.device_count()} GPU(s) "
                         f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    return dev


def check_ratios(ratios: List[float], decreasing: bool = False, flag: str = "--ops_ratios") -> None:
    for r in ratios:
        if not 0.0 < r <= 1.0:
            raise UsageError(f"{flag} value {r} is out of range; give fractions in (0, 1] "
                             "(0.14 keeps 14 %)")
    if decreasing and any(b >= a for a, b in zip(ratios, ratios[1:])):
        raise UsageError(f"{flag} must be strictly decreasing for iterative pruning, "
                         f"got {' '.join(map(str, ratios))}")


def default_milestones(epochs: int, given: Optional[List[int]]) -> List[int]:
    if given:
        return sorted(given)
    return sorted({max(1, int(epochs * 0.5)), max(1, int(epochs * 0.75))})


def _is_user_error(err: BaseException) -> bool:
    mod = type(err).__module__.split(".")[0]
    return isinstance(err, ValueError) and (mod in _OUR_PACKAGES or mod == "__main__")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so that every `finally` runs (temp files removed, logs
    closed) and the last complete checkpoint stays as it is."""


def _on_sigterm(signum, frame):
    # A second SIGTERM while cleaning up kills at once, as the default does.
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    raise Terminated()


def run_main(main: Callable[[Optional[List[str]]], int], argv: Optional[List[str]] = None,
             resume_hint: str = "run again with --resume to continue") -> None:
    """Run a script's main(); bad input -> one line on stderr and exit 2, a run-time failure
    (utils.log.RunFailure) -> one line and exit 1, Ctrl-C -> exit 130, SIGTERM -> exit 143
    (both after the `finally` blocks ran: no partial file is left, checkpoints are intact)."""
    prog = os.path.basename(sys.argv[0])
    from utils.distributed import cleanup
    try:
        signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread (e.g. called from a test runner's thread)
        pass
    try:
        code = main(argv)
    except KeyboardInterrupt as err:
        what = "terminated" if isinstance(err, Terminated) else "interrupted"
        print(f"\n{prog}: {what}; {resume_hint}", file=sys.stderr)
        sys.exit(143 if isinstance(err, Terminated) else 130)
    except Exception as err:  # noqa: BLE001 - only our own user errors are turned into one line
        from utils.log import RunFailure
        if isinstance(err, RunFailure):
            print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
            sys.exit(1)
        if _is_user_error(err):
            print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
            sys.exit(2)
        raise
    finally:
        cleanup()  # leave the torchrun process group, if any, in an orderly way
    sys.exit(code or 0)
