"""MAC and parameter counting, checked against hand counts and torchvision's published figures."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from models import get_model
from utils.flops import count_macs, count_macs_params, count_params, format_count


class ConvLinearNet(nn.Module):
    """conv 3->4 (3x3, pad 1) on 6x6, max-pool to 3x3, linear 36->5."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc(torch.flatten(x, 1))


CONV_LINEAR_MACS = 6 * 6 * 4 * 3 * 9 + 36 * 5


def test_conv_linear_exact_and_per_input():
    net = ConvLinearNet()
    assert count_macs(net, torch.randn(1, 3, 6, 6)) == CONV_LINEAR_MACS
    assert count_macs(net, torch.randn(7, 3, 6, 6)) == CONV_LINEAR_MACS
    assert count_params(net) == (4 * 27 + 4) + 2 * 4 + (36 * 5 + 5)


def test_counting_leaves_mode_and_buffers_unchanged():
    net = ConvLinearNet().train()
    net.bn.eval()  # mixed flags must come back as they were
    net.bn.running_mean.uniform_()
    buffers = {k: v.clone() for k, v in net.state_dict().items()}
    count_macs(net, torch.randn(4, 3, 6, 6))
    assert net.training and not net.bn.training and net.conv.training
    for key, value in net.state_dict().items():
        assert torch.equal(value, buffers[key]), key


def test_float64_model_and_tuple_inputs():
    net = ConvLinearNet().double()
    assert count_macs(net, (torch.randn(2, 3, 6, 6),)) == CONV_LINEAR_MACS


# Multi-head attention, embedding E = 8, 2 heads (head dim 4), L = 5 queries, S keys.
E, L = 8, 5


def mha_macs(source_len):
    projections = L * E * E + 2 * source_len * E * E + L * E * E  # q, k, v, out
    return projections + 2 * L * source_len * E  # Q·Kᵀ and A·V over all heads


@pytest.mark.parametrize("need_weights", [False, True])
@pytest.mark.parametrize("training", [False, True])
def test_multihead_attention_exact(need_weights, training):
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(E, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=need_weights)[0]

    block = Block().train(training)
    assert count_macs(block, torch.randn(3, L, E)) == mha_macs(L)
    assert block.training == training


def test_cross_attention_with_other_source_length():
    attn = nn.MultiheadAttention(E, 2, batch_first=True)
    query, memory = torch.randn(2, L, E), torch.randn(2, 7, E)
    assert count_macs(attn, (query, memory, memory)) == mha_macs(7)


def test_functional_products_are_counted():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(6, 4))

        def forward(self, x):  # x: (B, 2 heads, 5 tokens, 4)
            y = F.linear(x, self.w)  # 5*4*6 per head
            scores = torch.einsum("bhld,bhmd->bhlm", x, x)  # 5*5*4 per head
            mixed = torch.matmul(scores, x)  # 5*5*4 per head
            attended = F.scaled_dot_product_attention(x, x, y[..., :4])  # 2 * 5*5*4 per head
            return y.sum() + mixed.sum() + attended.sum()

    per_head = 5 * 4 * 6 + 5 * 5 * 4 + 5 * 5 * 4 + 2 * 5 * 5 * 4
    assert count_macs(Functional(), torch.randn(3, 2, 5, 4)) == 2 * per_head


def test_basis_buffers_count_as_parameters():
    net = ConvLinearNet()
    base = count_params(net)
    net.register_buffer("rotation_basis", torch.zeros(3, 3))
    net.register_buffer("running_thing", torch.zeros(10))
    net.conv.weight.requires_grad_(False)  # frozen parameters still count
    assert count_params(net) == base + 9


def test_cifar_parameter_counts_match_papers():
    assert count_params(get_model("vgg19", 10)) == pytest.approx(20.04e6, rel=0.01)
    assert count_params(get_model("resnet32", 10)) == pytest.approx(7.4e6, rel=0.01)


def test_resnet50_matches_torchvision_figures():
    macs, params = count_macs_params(get_model("resnet50", 1000), torch.randn(1, 3, 224, 224))
    assert macs == pytest.approx(4.09e9, rel=0.02)
    assert params == pytest.approx(25.6e6, rel=0.02)


def test_vit_b_16_matches_torchvision_figures():
    macs, params = count_macs_params(get_model("vit_b_16", 1000), torch.randn(1, 3, 224, 224))
    assert macs == pytest.approx(17.56e9, rel=0.02)
    assert params == pytest.approx(86.6e6, rel=0.02)


def test_format_count():
    assert format_count(4_089_184_256) == "4.09 G"
    assert format_count(20_035_018) == "20.04 M"
    assert format_count(1_500) == "1.50 K"
    assert format_count(950) == "950"
