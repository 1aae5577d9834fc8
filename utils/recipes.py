"""The published settings: the one table of defaults that the scripts' flags fall back on.

`--recipe oba` (the default) is the published OBA code (github NEU-REAL/OBA: train_prune.py,
iterative_prune.py, train_unstructured_prune.py, prune_imagenet.py). `--recipe eigendamage` is the
EigenDamage paper's own training schedules (github alecwangcq/EigenDamage-Pytorch: main_pretrain.py
and the configs/ of main_prune.py). A flag given on the command line always wins.

Milestones are kept as fractions of their phase's epochs, so `--num_epochs 20` without
`--milestones` drops the lr at 30 %, 50 % and 75 % of 20 epochs, as 60/100/150 do for 200.
"""
from __future__ import annotations

from fractions import Fraction
from typing import Dict, List, Optional

DEFAULT = "oba"


class Milestones:
    """lr drops at `at` epochs of an `of`-epoch phase; another epoch count scales them (floor,
    at least epoch 1, as the reference code's int(epochs * fraction))."""

    def __init__(self, at, of: int):
        self.at, self.of = tuple(at), of

    def scaled(self, epochs: int) -> List[int]:
        return sorted({max(1, int(Fraction(epochs) * a / self.of)) for a in self.at})

    def __eq__(self, other):
        return isinstance(other, Milestones) and self.fractions() == other.fractions()

    def fractions(self):
        return tuple(Fraction(a, self.of) for a in self.at)

    def __repr__(self):
        return f"Milestones({self.at}, of={self.of})"


_HALF_3Q = Milestones((2, 3), of=4)  # 1/2 and 3/4 of the epochs

# recipe -> flag -> value. Every recipe names every flag it sets.
RECIPES: Dict[str, Dict[str, object]] = {
    "oba": {
        # dense training: train_prune.py's --num_epochs/--lr/--weight_decay/--lr-decay-milestones
        "num_epochs": 200, "lr": 0.1, "weight_decay": 5e-4,
        "milestones": Milestones((60, 100, 150), of=200),
        # fine-tuning after pruning (--sl-*): 150 epochs, lr drops at 80 and 120
        "sl_num_epochs": 150, "sl_lr": 1e-3, "sl_weight_decay": 1e-4,
        "sl_milestones": Milestones((80, 120), of=150),
    },
    "eigendamage": {
        # dense training: main_pretrain.py (150 epochs, lr 0.1 dropped x0.1 at 1/2 and 3/4) with
        # the README's --weight_decay 0.0002 (the paper's Table 1 setting)
        "num_epochs": 150, "lr": 0.1, "weight_decay": 2e-4, "milestones": _HALF_3Q,
        # fine-tuning: configs/exp_for_cifar/*/one_pass/base/*.json (150 epochs, lr 1e-3,
        # weight decay 1e-4) with fine_tune_model's drops at 1/2 and 3/4
        "sl_num_epochs": 150, "sl_lr": 1e-3, "sl_weight_decay": 1e-4, "sl_milestones": _HALF_3Q,
    },
}

# Settings every recipe shares (the published OBA values; EigenDamage's differ by network, e.g.
# batch 64 for resnet32 and 128 for vgg19, so they stay flags).
SHARED: Dict[str, object] = {
    "batch_size": 64,            # --batch_size 64
    "iters_per_step": 200,       # importance on 200 batches per step ...
    "iterative_steps": 50,       # ... over 50 steps
    "max_pruning_ratio": 0.95,   # no layer loses more than 95 % of its channels
}

# What a script does differently: script -> recipe ("*": every recipe) -> flag -> value.
SCRIPTS: Dict[str, Dict[str, Dict[str, object]]] = {
    # published iterative_prune.py: 100 fine-tuning epochs per target, drops at 50 and 75;
    # EigenDamage's iterative configs fine-tune 150 epochs per round like its one-shot ones.
    "iterative_prune": {"oba": {"sl_num_epochs": 100, "sl_milestones": Milestones((50, 75), of=100)}},
    # published train_unstructured_prune.py: batches of 32, 49 exponential steps
    "train_unstructured_prune": {"*": {"batch_size": 32, "iterative_steps": 49}},
    # published prune_imagenet.py: 350 batches per step; batches of 2 images to score (the
    # published 16 per GPU over 8 processes); 64 images per batch to evaluate
    "prune_imagenet": {"*": {"iters_per_step": 350, "importance_batch_size": 2}},
}

# milestones flag -> the epochs flag of its phase
PHASES = {"milestones": "num_epochs", "sl_milestones": "sl_num_epochs"}


def value(script: Optional[str], recipe: str, dest: str):
    """What `recipe` gives flag `dest` in `script` (KeyError: the table does not set it)."""
    changes = SCRIPTS.get(script or "", {})
    for layer in (changes.get(recipe, {}), changes.get("*", {}), RECIPES[recipe], SHARED):
        if dest in layer:
            return layer[dest]
    raise KeyError(dest)


class ByRecipe:
    """A flag's default that depends on --recipe (or on the epochs of its phase); `resolve`
    replaces it by the value once the command line is parsed. str() is its --help text."""

    def __init__(self, dest: str, values: Dict[str, object], epochs: Dict[str, int]):
        self.dest, self.values, self.epochs = dest, values, epochs

    def _text(self, recipe: str) -> str:
        v = self.values[recipe]
        if isinstance(v, Milestones):
            return (f"{' '.join(map(str, v.scaled(self.epochs[recipe])))} of "
                    f"{self.epochs[recipe]} epochs")
        return f"{v:g}" if isinstance(v, float) else str(v)

    def __str__(self):
        texts = {r: self._text(r) for r in self.values}
        if len(set(texts.values())) == 1:
            return next(iter(texts.values()))
        return "; ".join(f"{r}: {t}" for r, t in texts.items())


def default(script: Optional[str], dest: str):
    """The argparse default of flag `dest` in `script`: the value itself when every recipe agrees,
    else a ByRecipe placeholder (milestones always: they scale with the phase's epochs)."""
    values = {r: value(script, r, dest) for r in RECIPES}
    first = next(iter(values.values()))
    if not isinstance(first, Milestones) and all(v == first for v in values.values()):
        return first
    epochs = {r: value(script, r, PHASES[dest]) for r in RECIPES} if dest in PHASES else {}
    return ByRecipe(dest, values, epochs)


def resolve(args) -> None:
    """Replace every ByRecipe default left in the parsed `args` by --recipe's value, then turn
    milestone fractions into epochs of the phase's (possibly changed) epoch count."""
    recipe = getattr(args, "recipe", None) or DEFAULT
    for dest, v in list(vars(args).items()):
        if isinstance(v, ByRecipe):
            setattr(args, dest, v.values[recipe])
    for dest, epochs in PHASES.items():
        v = getattr(args, dest, None)
        if isinstance(v, Milestones):
            setattr(args, dest, v.scaled(getattr(args, epochs)))
        elif isinstance(v, (list, tuple)):
            setattr(args, dest, sorted(v))
