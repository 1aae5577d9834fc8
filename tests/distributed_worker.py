"""Scores computed by the criteria on a tiny float64 network, over batches shared out by
BatchStream: run once in-process (one process) and once under torchrun (two gloo processes) by
tests/test_distributed.py, which compares the two."""
import os
import sys

import torch
import torch.nn as nn
from torch.utils.data import TensorDataset

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pruners import parameter_scores  # noqa: E402
from utils.data import BatchStream  # noqa: E402
from utils.distributed import average_batchnorm_statistics, init_distributed, is_main  # noqa: E402
from utils.engine import recalibrate_batchnorm  # noqa: E402

CRITERIA = {"OBA": {}, "fastOBA": {}, "Taylor": {}, "C-OBD": {"fisher_type": "empirical"},
            "C-OBS": {"fisher_type": "empirical"}, "Kron-OBD": {"fisher_type": "empirical"},
            "Kron-OBS": {"fisher_type": "empirical"}}
BATCHES = 4


def network() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 5, 3, padding=1), nn.BatchNorm2d(5), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3)).double()


def dataset() -> TensorDataset:
    gen = torch.Generator().manual_seed(1)
    return TensorDataset(torch.randn(40, 3, 6, 6, generator=gen, dtype=torch.float64),
                         torch.randint(0, 3, (40,), generator=gen))


def compute() -> dict:
    """{criterion: scores} and the re-estimated BatchNorm statistics, as every process sees them."""
    net = network()
    stream = BatchStream(dataset(), batch_size=5, seed=3)
    results = {name: parameter_scores(name, net, stream(BATCHES), **options)
               for name, options in CRITERIA.items()}
    used = recalibrate_batchnorm(net, stream(BATCHES), torch.device("cpu"))
    average_batchnorm_statistics(net, used)
    results["batchnorm"] = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    return results


if __name__ == "__main__":
    init_distributed("cpu")
    out = compute()
    # every criterion scored every process's network; the comparison itself is the test's
    assert set(out) == set(CRITERIA) | {"batchnorm"}, sorted(out)
    assert all(torch.isfinite(v).all() for scores in out.values() for v in scores.values())
    gathered = [None] * int(os.environ.get("WORLD_SIZE", "1"))
    torch.distributed.all_gather_object(gathered, out)
    if is_main():
        torch.save(gathered, sys.argv[1])
