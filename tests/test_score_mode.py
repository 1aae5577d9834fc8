"""--score_mode: every criterion scores the network in the chosen mode (train: BatchNorm on batch
statistics, as the published code; eval: running statistics), and scoring never changes running
statistics or the model's own train/eval flags."""
import copy

import pytest
import torch
import torch.nn as nn

from pruners import parameter_scores
from pruners.registry import CriterionError, available_methods, get_method

DATA_CRITERIA = [m for m in available_methods() if get_method(m).needs_data]


def network():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)).double()
    with torch.no_grad():  # running statistics far from any batch's own
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.5, 2.0)
    return net


def batches():
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 5, 5, generator=gen, dtype=torch.float64),
             torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]


def test_every_criterion_is_registered_for_both_modes():
    assert {"OBA", "fastOBA", "Taylor", "C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS", "Eigen"} <= \
        set(DATA_CRITERIA)


@pytest.mark.parametrize("name", DATA_CRITERIA)
def test_mode_is_applied_and_nothing_changes(name):
    net = network()
    net.eval()
    net[1].train()  # a mixed state, to check flags are restored module by module
    before = copy.deepcopy(net.state_dict())
    flags = [m.training for m in net.modules()]
    options = {"fisher_type": "empirical"} if name in ("C-OBD", "C-OBS", "Kron-OBD", "Kron-OBS",
                                                        "Eigen") else {}
    train = parameter_scores(name, net, batches(), score_mode="train", **options)
    evals = parameter_scores(name, net, batches(), score_mode="eval", **options)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert [m.training for m in net.modules()] == flags
    # BatchNorm with batch statistics is a different function from BatchNorm with running ones
    assert any(not torch.allclose(train[k], evals[k]) for k in train), name


def test_taylor_matches_a_hand_computation_in_each_mode():
    for mode in ("train", "eval"):
        net = network()
        scores = parameter_scores("Taylor", net, batches(), score_mode=mode)
        ref = copy.deepcopy(net)
        ref.train(mode == "train")
        total = {}
        for x, y in batches():
            ref.zero_grad()
            nn.functional.cross_entropy(ref(x), y).backward()
            for n, p in ref.named_parameters():
                if p.grad is not None and "1." not in n[:2] and "4." not in n[:2]:
                    total[n] = total.get(n, 0) + (p.detach() * p.grad).abs() / 2
        for n, v in total.items():
            torch.testing.assert_close(scores[n], v, msg=f"{mode} {n}")


def test_unknown_mode_is_a_clear_error():
    with pytest.raises(CriterionError, match="score mode"):
        parameter_scores("Taylor", network(), batches(), score_mode="inference")


def test_nan_scores_are_refused_before_anything_is_removed():
    from pruners.driver import PruneSettings, prune_to_target
    from utils.log import RunFailure
    net = network().float()
    with torch.no_grad():
        net[3].weight[0, 0, 0, 0] = float("nan")
    shapes = {k: v.shape for k, v in net.state_dict().items()}
    data = [(x.float(), y) for x, y in batches()]
    with pytest.raises(RunFailure, match="NaN/inf importance scores"):
        parameter_scores("Taylor", net, data)
    with pytest.raises(RunFailure, match="nothing was removed"):
        prune_to_target(net, "Taylor", lambda n: data[:n], nn.CrossEntropyLoss(),
                        torch.zeros(1, 3, 5, 5), PruneSettings(0.5, iterative_steps=2),
                        [net[8]], progress=False)
    assert {k: v.shape for k, v in net.state_dict().items()} == shapes
