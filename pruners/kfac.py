"""Kronecker-factored (K-FAC) curvature statistics for conv and linear layers.

For a layer with output z = W a (conv: per spatial position, a = the im2col patch), K-FAC
approximates the layer's Fisher as F ≈ S ⊗ A with

    A = E[a aᵀ]          averaged over examples and positions (a gets a trailing 1 when the
                         layer has a bias, so the bias is the last column of θ = [W | b]),
    S = E_n[Σ_t s_t s_tᵀ] averaged over examples, summed over positions t,

where s_t = ∂ℓ_n/∂z_t is the gradient of the *per-example* loss. The loss function is assumed
to average over the batch (as nn.CrossEntropyLoss does), so s = batch size × the gradient of
the batch loss. Summing S over positions (the KFC convention) gives S ⊗ A the scale of the
per-example Fisher E[vec(∇_θ ℓ) vec(∇_θ ℓ)ᵀ] under spatial homogeneity, so layer scores from
different layers (and C-OBD's exact diagonal) are comparable.

On the CPU, A of a stride-1 conv is summed from C × C products of the input with shifted copies
of itself (`conv_input_gram_by_shifts`): the same matrix as the im2col Gram, with about 4× fewer
multiply-adds for 3×3 kernels and no patch copy; other layers use the Gram of the patches.

Also collected on request:
  A_channels  E[x xᵀ] over input channels only, with spatial positions as samples (conv) or the
              raw inputs without the bias 1 (linear): the input factor EigenDamage rotates by.
  fisher_diag E_n[(∇_θ ℓ_n)²] from per-example gradients (conv: summed over positions),
              in the same out × (in·k·k [+1]) layout as θ.
  theta_A     θA = E[z aᵀ] (out × (in·k·k [+1])) with z = θa the layer's output, and
              A_diagonal_mean = mean(diag A) = E[‖a‖²]/dim: all that Kron-OBD/OBS need of A.
              Collected like a weight gradient (conv: the conv's weight-gradient kernel with
              z in place of ∂ℓ/∂z), without forming the im2col patches or the d × d factor A:
              about d/(2·out) times fewer flops than A itself.

The true Fisher (targets sampled from the model's predictive distribution) is the default;
fisher_type='empirical' uses the data's targets. Estimation runs in eval mode under
`preserved_state`, so BatchNorm buffers and train/eval flags are as they were afterwards, and
the gradients are taken with torch.autograd.grad, so no parameter's .grad is touched.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from utils.distributed import all_reduce_dict, all_reduce_sum, is_distributed
from utils.log import warn_once

from .registry import Batch, CriterionError, model_device, preserved_state, to_device

FISHER_TYPES = ("true", "empirical")
# Upper bound on the elements of one temporary (unfolded patches, per-example gradients).
_CHUNK_ELEMENTS = 1 << 24


@dataclass
class LayerStatistics:
    """K-FAC factors of one layer; matrices use the θ = [W.view(out, -1) | b] layout."""

    S: torch.Tensor
    A: Optional[torch.Tensor] = None
    A_channels: Optional[torch.Tensor] = None
    fisher_diag: Optional[torch.Tensor] = None
    theta_A: Optional[torch.Tensor] = None
    A_diagonal_mean: Optional[torch.Tensor] = None
    has_bias: bool = False
    examples: int = 0
    input_samples: int = 0  # rows a (examples × positions) that A is averaged over


# ---------------------------------------------------------------------------------------------
# Layers and the θ matrix layout

def is_kfac_layer(module: nn.Module) -> bool:
    """Linear layers and ungrouped 2-d convolutions (grouped convs have per-group factors)."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def kfac_layers(model: nn.Module, ignored: Iterable[Union[str, nn.Module]] = ()
                ) -> Dict[str, nn.Module]:
    """{qualified name: module} of every K-FAC layer except those named or given in `ignored`."""
    skip = {x for x in ignored if isinstance(x, str)}
    skip_ids = {id(x) for x in ignored if isinstance(x, nn.Module)}
    return {name: m for name, m in model.named_modules()
            if is_kfac_layer(m) and name not in skip and id(m) not in skip_ids}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """θ = [W.view(out, -1) | b] (the bias column only when the layer has one)."""
    w = module.weight.reshape(module.weight.shape[0], -1)
    if module.bias is not None:
        w = torch.cat([w, module.bias.reshape(-1, 1)], dim=1)
    return w


def matrix_to_parameters(module: nn.Module, matrix: torch.Tensor) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Split an out × (in·k·k [+1]) matrix back into weight-shaped and bias-shaped tensors."""
    n_weight = module.weight[0].numel()
    weight = matrix[:, :n_weight].reshape(module.weight.shape)
    bias = matrix[:, n_weight] if module.bias is not None else None
    return weight, bias


def named_matrix_scores(layer_name: str, module: nn.Module, matrix: torch.Tensor
                        ) -> Dict[str, torch.Tensor]:
    """{'<layer>.weight': ..., '<layer>.bias': ...} from a score matrix in θ layout."""
    weight, bias = matrix_to_parameters(module, matrix)
    prefix = f"{layer_name}." if layer_name else ""
    scores = {prefix + "weight": weight.detach()}
    if bias is not None:
        scores[prefix + "bias"] = bias.detach()
    return scores


# ---------------------------------------------------------------------------------------------
# Factor helpers

def symmetrize(m: torch.Tensor) -> torch.Tensor:
    """(m + mᵀ) / 2 as a new tensor (one allocation)."""
    return (m + m.transpose(-1, -2)).mul_(0.5)


def damped(factor: torch.Tensor, damping: float) -> torch.Tensor:
    """factor + damping · mean(diag(factor)) · I: damping relative to the factor's own scale,
    so one value suits layers and data sets of any scale. A tiny floor keeps an all-zero
    factor (e.g. a dead layer) invertible."""
    result = symmetrize(factor)  # a new tensor: the shift below is added in place
    result.diagonal().add_(damping_shift(torch.diagonal(factor).mean(), damping))
    return result


def damping_shift(diagonal_mean: torch.Tensor, damping: float) -> torch.Tensor:
    """The multiple of I that `damped` adds to a factor whose diagonal has mean `diagonal_mean`."""
    floor = torch.finfo(diagonal_mean.dtype).tiny ** 0.5
    return damping * diagonal_mean.clamp_min(0) + floor


def _cholesky(matrix: torch.Tensor, warn: bool = True) -> Optional[torch.Tensor]:
    """The lower Cholesky factor of an SPD matrix, or None when it is numerically indefinite
    (with a warning unless `warn` is off: the callers fall back to the pseudo-inverse)."""
    chol, info = torch.linalg.cholesky_ex(matrix)
    if bool(info.any()):
        if warn:
            warn_once("kfac-cholesky", "a K-FAC factor is not positive definite (Cholesky "
                                       "failed); its pseudo-inverse is used instead. A larger "
                                       "--damping avoids this")
        return None
    return chol


def _inverse_cholesky_factor(f64: torch.Tensor) -> Optional[torch.Tensor]:
    """L⁻¹ for the Cholesky factor L of a float64 SPD matrix (A⁻¹ = L⁻ᵀ L⁻¹), or None (see
    _cholesky). One triangular solve against the identity."""
    chol = _cholesky(f64)
    if chol is None:
        return None
    eye = torch.eye(f64.shape[-1], dtype=f64.dtype, device=f64.device)
    return torch.linalg.solve_triangular(chol, eye, upper=False)


# Column blocks of L⁻¹ solved apart in spd_inverse_diagonal. Block [a, b) of L⁻¹ is zero above
# row a, so it needs only the trailing triangle L[a:, a:]: with k blocks the solves cost about
# (1/3 + 1/(2k) + 1/(6k²)) n³/2 multiply-adds instead of n³/2 for one solve against the whole
# identity. Measured on CPU (float64, n = 4609, one thread): 8 blocks 2.1× faster than one.
_INVERSE_DIAGONAL_BLOCKS = 8
_INVERSE_DIAGONAL_MIN_BLOCK = 256


def _block_edges(width: int, most: int, least_size: int) -> list:
    """Edges of up to `most` near-equal blocks of [0, width), none narrower than `least_size`
    (one block when width < 2 · least_size)."""
    blocks = max(1, min(most, width // least_size))
    return [round(width * i / blocks) for i in range(blocks + 1)]


def _inverse_column_squares(chol: torch.Tensor) -> torch.Tensor:
    """Σ_k (L⁻¹)_ki² for every column i, solving L⁻¹ a block of columns at a time."""
    n = chol.shape[-1]
    edges = _block_edges(n, _INVERSE_DIAGONAL_BLOCKS, _INVERSE_DIAGONAL_MIN_BLOCK)
    result = torch.empty(n, dtype=chol.dtype, device=chol.device)
    for start, stop in zip(edges[:-1], edges[1:]):
        identity_block = torch.zeros(n - start, stop - start, dtype=chol.dtype, device=chol.device)
        identity_block[:stop - start].fill_diagonal_(1)
        columns = torch.linalg.solve_triangular(chol[start:, start:], identity_block, upper=False)
        result[start:stop] = columns.pow(2).sum(0)
    return result


def spd_inverse(factor: torch.Tensor) -> torch.Tensor:
    """Inverse of a symmetric positive-definite factor, computed in float64 (the symmetric
    pseudo-inverse when Cholesky fails). Cholesky reads only the lower triangle, so the factor
    is symmetrised only for the fallback."""
    f64 = factor.double()
    chol_inv = _inverse_cholesky_factor(f64)
    if chol_inv is None:
        inv = torch.linalg.pinv(symmetrize(f64), hermitian=True)
    else:
        inv = chol_inv.transpose(-1, -2) @ chol_inv
    return symmetrize(inv).to(factor.dtype)


def spd_inverse_diagonal(factor: torch.Tensor) -> torch.Tensor:
    """diag(factor⁻¹) without forming the inverse: Σ_k (L⁻¹)_ki², computed in the factor's own
    precision (at least float32), in float64 when Cholesky fails there, and from the
    pseudo-inverse when it fails in float64 too.

    Why not always float64 (twice the time of the O(n³) part): the factors are summed in float32
    anyway, and the channel scores hardly move. Measured on the 1152–4608-wide
    input factors of a trained vgg19 (digits, 20 and 2 batches of 64, damping 1e-3, condition
    numbers up to 1.6·10⁶), against a float64 sum factorised in float64: the largest relative
    error of an entry of diag(A⁻¹) was ≤ 9·10⁻⁴ factorised in float64 and ≤ 3.3·10⁻³ in
    float32 (2–6× more in the 4608-wide layers); channel scores moved by ≤ 1.1·10⁻⁴, about 11×
    less than the gap at the pruning cut, and C-OBS removed the same channels
    (docs/results/importance_cost.md)."""
    work = factor if factor.dtype in (torch.float32, torch.float64) else factor.float()
    chol = _cholesky(work, warn=work.dtype == torch.float64)
    if chol is None and work.dtype != torch.float64:
        work = factor.double()
        chol = _cholesky(work)
    if chol is None:
        return torch.diagonal(torch.linalg.pinv(symmetrize(work), hermitian=True)).to(factor.dtype)
    return _inverse_column_squares(chol).to(factor.dtype)


def symmetric_eigh(factor: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """(eigenvalues ≥ 0 in ascending order, orthonormal eigenvectors as columns), in float64;
    tiny negative eigenvalues from round-off are clamped to zero."""
    values, vectors = torch.linalg.eigh(symmetrize(factor.double()))
    return values.clamp_min(0), vectors


# ---------------------------------------------------------------------------------------------
# Targets

def check_fisher_type(fisher_type: str) -> None:
    if fisher_type not in FISHER_TYPES:
        raise CriterionError(
            f"unknown fisher_type '{fisher_type}'; use 'true' (sampled targets) or 'empirical'")


def sample_targets(outputs: torch.Tensor) -> torch.Tensor:
    """Class labels drawn from softmax(outputs) over the last axis (the true-Fisher targets)."""
    probs = torch.softmax(outputs.detach().float(), dim=-1)
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1).reshape(probs.shape[:-1])


# ---------------------------------------------------------------------------------------------
# Per-layer (activations, gradients) -> samples a: (N, P, d), s: (N, P, out)

def _conv_padding(module: nn.Conv2d) -> Tuple[int, int, int, int]:
    """(left, right, top, bottom) padding the conv applies, for any padding spec."""
    if isinstance(module.padding, str):
        if module.padding == "valid":
            return (0, 0, 0, 0)
        pads = []
        for k, d in zip(module.kernel_size, module.dilation):  # 'same'
            total = d * (k - 1)
            pads.append((total // 2, total - total // 2))
        (top, bottom), (left, right) = pads
        return (left, right, top, bottom)
    ph, pw = module.padding
    return (pw, pw, ph, ph)


def padded_input(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """x with the padding the conv applies (any padding spec and padding_mode)."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, _conv_padding(module), mode=mode)


def conv_patches(module: nn.Conv2d, x: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
    """im2col patches (N, positions, in·kh·kw) in the order of weight.view(out, -1), with a
    trailing column of ones when `bias_column`."""
    x = padded_input(module, x)
    (kh, kw), (sh, sw), (dh, dw) = module.kernel_size, module.stride, module.dilation
    # Sliding windows as views (N, C, oh, ow, kh, kw); cheaper than F.unfold plus a transpose.
    windows = x.unfold(2, (kh - 1) * dh + 1, sh).unfold(3, (kw - 1) * dw + 1, sw)
    windows = windows[..., ::dh, ::dw]
    n, c, oh, ow = windows.shape[:4]
    width = c * kh * kw
    # One copy straight into the result (with room for the bias column), not copy then concat.
    patches = x.new_empty(n, oh, ow, width + int(bias_column))
    patches[..., :width].view(n, oh, ow, c, kh, kw).copy_(windows.permute(0, 2, 3, 1, 4, 5))
    if bias_column:
        patches[..., width] = 1
    return patches.view(n, oh * ow, -1)


def _input_samples(module: nn.Module, x: torch.Tensor, bias_column: bool = False) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return conv_patches(module, x, bias_column)
    samples = x.reshape(x.shape[0], -1, x.shape[-1])
    return _with_bias_column(samples) if bias_column else samples


def _output_samples(module: nn.Module, g: torch.Tensor) -> torch.Tensor:
    if isinstance(module, nn.Conv2d):
        return g.reshape(g.shape[0], g.shape[1], -1).transpose(1, 2)
    return g.reshape(g.shape[0], -1, g.shape[-1])


def _channel_samples(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input-channel vectors with every spatial position (or token) as a sample: (M, in)."""
    if isinstance(module, nn.Conv2d):
        return x.transpose(1, -1).reshape(-1, x.shape[1])
    return x.reshape(-1, x.shape[-1])


def _with_bias_column(a: torch.Tensor) -> torch.Tensor:
    return torch.cat([a, a.new_ones(a.shape[:-1] + (1,))], dim=-1)


# ---------------------------------------------------------------------------------------------
# Diagonal Fisher from per-example gradients g_n = Σ_t s_nt a_ntᵀ (out × d)

# Forming each g_n costs 2·P flops per element of g_n plus several passes over memory (write,
# square, sum), which dominate when the position count P is small; the pair form costs
# P(P+1) flops per element in one GEMM. Measured on CPU the two break even near P = 12.
_PAIR_FORM_MAX_POSITIONS = 12


def _pairs_are_cheaper(positions: int) -> bool:
    return positions <= _PAIR_FORM_MAX_POSITIONS


def per_example_squares_by_gradients(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Σ_n g_n ⊙ g_n with g_n = s_nᵀ a_n formed a few examples at a time (a: N×P×d, s: N×P×out)."""
    out_dim, in_dim = s.shape[-1], a.shape[-1]
    step = max(1, _CHUNK_ELEMENTS // (out_dim * in_dim))
    total = a.new_zeros(out_dim, in_dim)
    for start in range(0, a.shape[0], step):
        g = torch.bmm(s[start:start + step].transpose(1, 2), a[start:start + step])
        total += g.square_().sum(0)  # squared in place: one temporary, not two
    return total


def per_example_squares_by_pairs(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """The same sum without forming g_n: (Σ_t s_t a_t)² = Σ_{t,u} (s_t s_u)(a_t a_u) elementwise,
    so Σ_n g_n ⊙ g_n = Σ_{n, t≤u} w_tu (s_nt ⊙ s_nu)ᵀ (a_nt ⊙ a_nu), w = 1 on the diagonal and 2
    off it: one GEMM over N·P(P+1)/2 rows."""
    positions, out_dim, in_dim = a.shape[1], s.shape[-1], a.shape[-1]
    first, second = torch.triu_indices(positions, positions, device=a.device)
    weight = torch.where(first == second, 1.0, 2.0).to(s.dtype).unsqueeze(-1)
    per_example = first.numel() * (out_dim + in_dim)
    step = max(1, _CHUNK_ELEMENTS // per_example)
    total = a.new_zeros(out_dim, in_dim)
    for start in range(0, a.shape[0], step):
        sc, ac = s[start:start + step], a[start:start + step]
        s_pairs = (sc[:, first] * sc[:, second] * weight).reshape(-1, out_dim)
        a_pairs = (ac[:, first] * ac[:, second]).reshape(-1, in_dim)
        total.addmm_(s_pairs.t(), a_pairs)
    return total


# ---------------------------------------------------------------------------------------------
# Collection

def _add_gram(total: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """total + rowsᵀ rows, in place after the first call: for a 4609² input factor a fresh
    product per chunk costs two large allocations (and their page faults) each time."""
    if total is None:
        return rows.t() @ rows
    return total.addmm_(rows.t(), rows)


# Wide Gram matrices (the full-input factor A, up to 4609² on vgg19) are accumulated on and
# below the diagonal blocks only, a block-row at a time, and mirrored once at the end: with
# k block-rows that is (k + 1) / 2k of the multiply-adds of the full product.
_GRAM_BLOCKS = 4
_GRAM_MIN_BLOCK = 512


def _gram_edges(width: int) -> list:
    return _block_edges(width, _GRAM_BLOCKS, _GRAM_MIN_BLOCK)


def _add_lower_gram(total: Optional[torch.Tensor], rows: torch.Tensor) -> torch.Tensor:
    """total + rowsᵀ rows on and below the diagonal blocks (the rest of `total` stays zero);
    `mirror_lower_gram` completes it."""
    edges = _gram_edges(rows.shape[1])
    if len(edges) == 2:
        return _add_gram(total, rows)
    if total is None:
        total = rows.new_zeros(rows.shape[1], rows.shape[1])
    for start, stop in zip(edges[:-1], edges[1:]):
        total[start:stop, :stop].addmm_(rows[:, start:stop].t(), rows[:, :stop])
    return total


def mirror_lower_gram(total: torch.Tensor) -> torch.Tensor:
    """The symmetric matrix whose lower block triangle `_add_lower_gram` accumulated."""
    edges = _gram_edges(total.shape[1])
    if len(edges) == 2:
        return total
    for start, stop in zip(edges[1:-1], edges[2:]):  # block-rows below the first
        total[:start, start:stop] = total[start:stop, :start].t()
    return total


# ---------------------------------------------------------------------------------------------
# The input factor of stride-1 convolutions from shifted channel products

def by_shifted_products(module: nn.Module) -> bool:
    """Whether A is accumulated by `conv_input_gram_by_shifts` rather than as the Gram of im2col
    patches: for stride-1 ungrouped convs on the CPU. GPUs keep the im2col path: one large GEMM
    suits them better than a few hundred small C × C products per layer and batch (not yet
    measured there)."""
    return (isinstance(module, nn.Conv2d) and module.groups == 1
            and tuple(module.stride) == (1, 1) and module.weight.device.type == "cpu")


ShiftPairs = Tuple[Tuple[int, int], Tuple[Tuple[int, int], ...]]


@functools.lru_cache(maxsize=None)
def kernel_offset_pairs(kh: int, kw: int) -> Tuple[ShiftPairs, ...]:
    """The pairs (p, q) of flat kernel offsets (p = i·kw + j) with p ≤ q, grouped by their
    shift (di, dj) = q − p in 2-d: ((di, dj), ((p, q), ...)) for every shift, in the order of
    the blocks of `conv_input_gram_by_shifts`."""
    shifts = [(0, dj) for dj in range(kw)]
    shifts += [(di, dj) for di in range(1, kh) for dj in range(1 - kw, kw)]
    return tuple(((di, dj), tuple((i * kw + j, (i + di) * kw + j + dj)
                                  for i in range(max(0, -di), min(kh, kh - di))
                                  for j in range(max(0, -dj), min(kw, kw - dj))))
                 for di, dj in shifts)


def _axis_segments(padded: int, kernel: int, dilation: int, data: Tuple[int, int]
                   ) -> Tuple[list, list]:
    """[0, padded) cut at every window edge and at the edges (lo, hi) of the data: the segments
    (start, stop), and for each kernel offset i the set of indices of the segments that make up
    its window [i·dilation, i·dilation + out)."""
    out = padded - (kernel - 1) * dilation
    starts = [i * dilation for i in range(kernel)]
    cuts = sorted({*data, *starts, *(s + out for s in starts)})
    segments = list(zip(cuts[:-1], cuts[1:]))
    windows = [{k for k, (a, b) in enumerate(segments) if s <= a and b <= s + out}
               for s in starts]
    return segments, windows


def _data_overlap(segment: Tuple[int, int], shift: int, data: Tuple[int, int]
                  ) -> Tuple[int, int]:
    """The part of a segment that lies in the data and whose copy `shift` further on does too:
    the rest meets zero padding and adds nothing to a product (empty when start ≥ stop)."""
    return (max(segment[0], data[0], data[0] - shift), min(segment[1], data[1], data[1] - shift))


def _rectangle_rows(grid: torch.Tensor, rows: Tuple[int, int], cols: Tuple[int, int]
                    ) -> torch.Tensor:
    """A rectangle of the (H, W, N, C) grid as a (batch, rows, C) view: one matrix per image
    row, or a single one when the rectangle spans whole rows."""
    part = grid[rows[0]:rows[1], cols[0]:cols[1]]
    batch = 1 if part.shape[1] == grid.shape[1] else part.shape[0]
    return part.view(batch, -1, grid.shape[-1])


def conv_input_gram_by_shifts(module: nn.Conv2d, x: torch.Tensor,
                              blocks: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Σ a aᵀ over the examples and output positions of a stride-1 conv (a: the im2col patch,
    without the bias 1) as its C × C blocks (p, q), p ≤ q, in `kernel_offset_pairs` order:
    `blocks` plus this batch's sums (allocated on the first call, then added to in place).

    Block (p, q) = Σ_n Σ_{u ∈ W_p} xp[n, :, u] xp[n, :, u + r]ᵀ, with xp the padded input,
    r = (q − p)·dilation and W_p the positions offset p = (i, j) sees: rows [i·dh, i·dh + H_out),
    columns [j·dw, j·dw + W_out). It depends on (p, q) only through r and W_p. Cutting xp's rows
    and columns at every window edge makes each W_p a union of rectangles, so one product per
    (shift, rectangle), the rectangle's rows (examples × positions, C wide) against the rows r
    further on, serves every block of that shift whose window holds the rectangle: each block
    is the sum of those products, the same terms grouped differently, hence exact. Parts that
    meet zero padding are skipped. About (shifts) · N·H·W·C² multiply-adds (13 for 3×3) against
    (k²)²·N·P·C² for the im2col Gram (81 for 3×3, 5/8 of it done by `_add_lower_gram`), and no
    patch copy."""
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    left, right, top, bottom = _conv_padding(module)
    xp = padded_input(module, x)
    _, channels, height, width = xp.shape
    # (H, W, N, C): a run of columns of one image row is one contiguous (columns·N, C) matrix.
    grid = xp.permute(2, 3, 0, 1).contiguous()
    zeros = module.padding_mode == "zeros"  # other modes pad with data: nothing to skip
    row_data = (top, height - bottom) if zeros else (0, height)
    col_data = (left, width - right) if zeros else (0, width)
    row_segments, row_windows = _axis_segments(height, kh, dh, row_data)
    col_segments, col_windows = _axis_segments(width, kw, dw, col_data)
    pairs = kernel_offset_pairs(kh, kw)
    first = blocks is None
    if first:  # every block is written below (beta=0 or zero_), so no zero fill here
        blocks = x.new_empty(sum(len(p) for _, p in pairs), channels, channels)
    products = x.new_empty(len(row_segments) * len(col_segments), channels, channels)
    # One product per image row of a rectangle, then summed (one for whole-row rectangles).
    rows_per_product = 1 if len(col_segments) == 1 else max(b - a for a, b in row_segments)
    row_products = x.new_empty(rows_per_product, channels, channels)
    start = 0
    for (di, dj), shift_pairs in pairs:
        dy, dx = di * dh, dj * dw
        shift_blocks = blocks[start:start + len(shift_pairs)].view(len(shift_pairs), -1)
        start += len(shift_pairs)
        owners = []  # for each product: the blocks whose window holds its rectangle
        for r, row_segment in enumerate(row_segments):
            rows = _data_overlap(row_segment, dy, row_data)
            if rows[0] >= rows[1]:
                continue
            for c, col_segment in enumerate(col_segments):
                cols = _data_overlap(col_segment, dx, col_data)
                if cols[0] >= cols[1]:
                    continue
                held = [k for k, (p, _) in enumerate(shift_pairs)
                        if r in row_windows[p // kw] and c in col_windows[p % kw]]
                if not held:
                    continue
                here = _rectangle_rows(grid, rows, cols)
                there = _rectangle_rows(grid, (rows[0] + dy, rows[1] + dy),
                                        (cols[0] + dx, cols[1] + dx))
                per_row = row_products[:here.shape[0]]
                torch.bmm(here.transpose(1, 2), there, out=per_row)
                torch.sum(per_row, 0, out=products[len(owners)])
                owners.append(held)
        if not owners:
            if first:
                shift_blocks.zero_()
            continue
        # Each block of this shift is the sum of the products of the rectangles in its window.
        membership = torch.zeros(len(shift_pairs), len(owners), dtype=x.dtype)
        for k, held in enumerate(owners):
            membership[held, k] = 1
        shift_blocks.addmm_(membership.to(x.device), products[:len(owners)].view(len(owners), -1),
                            beta=0 if first else 1)
    return blocks


def conv_window_sums(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Σ_n Σ_t a_nt of a stride-1 conv (the bias column of Σ a aᵀ), in weight order: entry
    c·kh·kw + p is the sum of channel c of the padded input over the window of offset p."""
    (kh, kw), (dh, dw) = module.kernel_size, module.dilation
    sums = padded_input(module, x).sum(0)
    out_h, out_w = sums.shape[1] - (kh - 1) * dh, sums.shape[2] - (kw - 1) * dw
    return sums.unfold(1, out_h, dh).unfold(2, out_w, dw).sum((-2, -1)).reshape(-1)


def gram_from_shift_blocks(blocks: torch.Tensor, kernel_size: Tuple[int, int],
                           bias_column: Optional[torch.Tensor] = None, count: int = 0
                           ) -> torch.Tensor:
    """The symmetric matrix Σ a aᵀ in θ layout from `conv_input_gram_by_shifts`' blocks: block
    (p, q) at rows c·k² + p and columns c'·k² + q, its transpose at (q, p); with `bias_column`
    (`conv_window_sums`), a last row and column of those sums and `count` (the number of
    positions) in the corner. Every entry is written once, so nothing is zero-filled."""
    kh, kw = kernel_size
    offsets, channels = kh * kw, blocks.shape[-1]
    width = channels * offsets
    index = {pair: k for k, pair in enumerate(
        pair for _, shift_pairs in kernel_offset_pairs(kh, kw) for pair in shift_pairs)}
    size = width + int(bias_column is not None)
    total = blocks.new_empty(size, size)
    by_offsets = total[:width, :width].view(channels, offsets, channels, offsets)
    # The rows of one offset p, blocks (p, q) for every q, gathered contiguously first: a
    # transpose into a contiguous buffer and one interleaving copy are several times faster
    # than writing each block, or its transpose, straight into the interleaved layout.
    strip = blocks.new_empty(offsets, channels, channels)
    for p in range(offsets):
        for q in range(offsets):
            strip[q] = blocks[index[p, q]] if p <= q else blocks[index[q, p]].t()
        by_offsets[:, p].copy_(strip.permute(1, 2, 0))
    if bias_column is not None:
        total[:width, width] = bias_column
        total[width, :width] = bias_column
        total[width, width] = count
    return total


class _Accumulator:
    """Running sums for one layer across calls and batches."""

    def __init__(self, module: nn.Module, full_input: bool, channel_input: bool, diagonal: bool,
                 weight_products: bool = False):
        self.module = module
        self.has_bias = module.bias is not None
        self.full_input, self.channel_input, self.diagonal = full_input, channel_input, diagonal
        self.weight_products = weight_products
        self.A = self.A_channels = self.S = self.F = self.TA = self.A_trace = None
        # Layers `by_shifted_products` picks keep A as the blocks of conv_input_gram_by_shifts
        # and its bias column in A_bias, assembled into θ layout once, in `result`. The others
        # keep the lower block triangle of the im2col Gram (bias column included) in A.
        self.by_shifts = full_input and by_shifted_products(module)
        self.A_bias = None
        self.positions = 0          # Σ examples × positions (A's denominator)
        self.channel_positions = 0  # Σ channel samples (A_channels' denominator)

    @staticmethod
    def _add(total, value):
        return value if total is None else total + value

    def add(self, x: torch.Tensor, output: torch.Tensor, grad: torch.Tensor,
            batch_size: int) -> None:
        dtype = torch.promote_types(x.dtype, torch.float32)
        x = x.to(dtype)
        s_all = _output_samples(self.module, grad.to(dtype) * batch_size)
        if self.weight_products:
            self._add_weight_products(x, output.to(dtype))
        n = x.shape[0]
        # S: mean over examples of Σ_t s sᵀ; the example count is added in `add_examples`.
        s_flat = s_all.reshape(-1, s_all.shape[-1])
        self.S = _add_gram(self.S, s_flat)
        if self.channel_input:
            c = _channel_samples(self.module, x)
            self.A_channels = _add_gram(self.A_channels, c)
            self.channel_positions += c.shape[0]
        if self.by_shifts:
            self.A = conv_input_gram_by_shifts(self.module, x, self.A)
            if self.has_bias:
                self.A_bias = self._add(self.A_bias, conv_window_sums(self.module, x))
            self.positions += s_all.shape[0] * s_all.shape[1]
        patch_input = self.full_input and not self.by_shifts
        if not (patch_input or self.diagonal):
            return
        # Unfold a few examples at a time to bound memory.
        per_example = max(1, s_all.shape[1] * (self.module.weight[0].numel() + 1))
        step = max(1, _CHUNK_ELEMENTS // per_example)
        for start in range(0, n, step):
            a = _input_samples(self.module, x[start:start + step], self.has_bias)
            s = s_all[start:start + step]
            if patch_input:
                a_flat = a.reshape(-1, a.shape[-1])
                self.A = _add_lower_gram(self.A, a_flat)
                self.positions += a_flat.shape[0]
            if self.diagonal:
                self.F = self._add(self.F, self._per_example_squares(a, s))

    def _add_weight_products(self, x: torch.Tensor, z: torch.Tensor) -> None:
        """Σ z aᵀ (= θ Σ a aᵀ, z = θa being the layer's output) and Σ ‖a‖² over samples."""
        module = self.module
        if isinstance(module, nn.Conv2d):
            x = padded_input(module, x)
            weight_part = torch.nn.grad.conv2d_weight(
                x, module.weight.shape, z, stride=module.stride, padding=0,
                dilation=module.dilation).reshape(z.shape[1], -1)
            # Σ_t ‖a_t‖²: the channel sum of x² convolved with a one-channel kernel of ones.
            ones = x.new_ones((1, 1) + tuple(module.weight.shape[2:]))
            squares = x.pow(2).sum(1, keepdim=True)
            trace = F.conv2d(squares, ones, stride=module.stride, dilation=module.dilation).sum()
            z_flat = _output_samples(module, z).reshape(-1, z.shape[1])
        else:
            x_flat, z_flat = x.reshape(-1, x.shape[-1]), z.reshape(-1, z.shape[-1])
            weight_part = z_flat.t() @ x_flat
            trace = x_flat.pow(2).sum()
        if self.has_bias:  # the bias column: a's trailing 1
            weight_part = torch.cat([weight_part, z_flat.sum(0).unsqueeze(1)], dim=1)
            trace = trace + z_flat.shape[0]
        self.TA = self._add(self.TA, weight_part)
        self.A_trace = self._add(self.A_trace, trace)
        if not self.full_input:  # A's denominator is counted with A otherwise
            self.positions += z_flat.shape[0]

    @staticmethod
    def _per_example_squares(a: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        """Σ_n (Σ_t s_nt a_ntᵀ)², by whichever of the two exact forms is cheaper."""
        if _pairs_are_cheaper(a.shape[1]):
            return per_example_squares_by_pairs(a, s)
        return per_example_squares_by_gradients(a, s)

    def _input_factor_sum(self) -> torch.Tensor:
        """Σ a aᵀ in θ layout from the running sums."""
        if not self.by_shifts:
            return mirror_lower_gram(self.A)
        # The blocks are let go as soon as A is built: the accumulators outlive this call.
        blocks, self.A = self.A, None
        return gram_from_shift_blocks(blocks, self.module.kernel_size, self.A_bias, self.positions)

    def result(self, examples: int) -> Optional[LayerStatistics]:
        if self.S is None:  # never called as a module (e.g. MultiheadAttention's out_proj)
            return None
        # The sums are this accumulator's own tensors: normalised in place (no n² copies).
        return LayerStatistics(
            S=self.S.div_(examples),
            A=self._input_factor_sum().div_(self.positions) if self.A is not None else None,
            A_channels=(self.A_channels.div_(self.channel_positions)
                        if self.A_channels is not None else None),
            fisher_diag=self.F.div_(examples) if self.F is not None else None,
            theta_A=self.TA.div_(self.positions) if self.TA is not None else None,
            A_diagonal_mean=(self.A_trace / (self.positions * self.TA.shape[1])
                             if self.TA is not None else None),
            has_bias=self.has_bias, examples=examples, input_samples=self.positions)


def collect_kfac_statistics(model: nn.Module, batches: Iterable[Batch], loss_fn: Callable,
                            fisher_type: str = "true",
                            ignored: Iterable[Union[str, nn.Module]] = (),
                            layers: Optional[Dict[str, nn.Module]] = None,
                            full_input: bool = True, channel_input: bool = False,
                            diagonal: bool = False, weight_products: bool = False
                            ) -> Dict[str, LayerStatistics]:
    """K-FAC statistics of every conv/linear layer, averaged over all examples of `batches`.

    layers: {key: module} to measure (default: `kfac_layers(model, ignored)`); keys name the
        results. full_input: collect A (im2col, bias 1); channel_input: collect A_channels;
        diagonal: collect the per-example-gradient diagonal Fisher; weight_products: collect
        theta_A and A_diagonal_mean (the weights must not change while collecting).
    loss_fn(outputs, targets) must average over the batch (see the module note on scaling).
    Layers whose forward is never called as a module (MultiheadAttention reads its out_proj
    weights directly) are left out of the result.
    """
    check_fisher_type(fisher_type)
    if layers is None:
        layers = kfac_layers(model, ignored)
    if not layers:
        raise CriterionError("the model has no conv/linear layer to estimate K-FAC factors for")
    device = model_device(model)
    accumulators = {key: _Accumulator(m, full_input, channel_input, diagonal, weight_products)
                    for key, m in layers.items()}
    examples = 0
    with preserved_state(model):  # in the caller's mode; BatchNorm statistics restored after
        for batch in batches:
            x, y = to_device(batch, device)
            examples += x.shape[0]
            _accumulate_batch(model, layers, accumulators, x, y, loss_fn, fisher_type)
    if is_distributed():
        examples = _sum_over_processes(accumulators, examples)
    if examples == 0:
        raise CriterionError("no batches were given for K-FAC estimation; "
                             "pass at least one (inputs, targets) batch")
    results = {key: acc.result(examples) for key, acc in accumulators.items()}
    return {key: st for key, st in results.items() if st is not None}


def _sum_over_processes(accumulators: Dict[str, "_Accumulator"], examples: int) -> int:
    """Add every process's running sums and counts (torchrun): the factors then equal those of
    one process over all the batches. Returns the total example count."""
    empty = all_reduce_sum(torch.tensor([float(examples == 0)], dtype=torch.float64))
    if empty[0] > 0:  # fail on every process together, not in a mismatched all-reduce
        raise CriterionError("a process received no K-FAC batch; start at most as many processes "
                             "as there are batches per step")
    sums, counts = {}, [float(examples)]
    for key in sorted(accumulators):
        acc = accumulators[key]
        for field in ("S", "A", "A_bias", "A_channels", "F", "TA", "A_trace"):
            value = getattr(acc, field)
            if value is not None:
                sums[f"{key}\0{field}"] = value
        counts += [float(acc.positions), float(acc.channel_positions)]
    sums = all_reduce_dict(sums)
    totals = all_reduce_sum(torch.tensor(counts, dtype=torch.float64)).tolist()
    for name, value in sums.items():
        key, field = name.split("\0")
        setattr(accumulators[key], field, value)
    for i, key in enumerate(sorted(accumulators)):
        accumulators[key].positions = int(totals[1 + 2 * i])
        accumulators[key].channel_positions = int(totals[2 + 2 * i])
    return int(totals[0])


def _accumulate_batch(model, layers, accumulators, x, y, loss_fn, fisher_type) -> None:
    records: Dict[str, list] = {key: [] for key in layers}

    def recorder(key):
        def hook(module, inputs, output):
            records[key].append((inputs[0].detach(), output))
            # Hand on a copy, so an in-place op after the layer (ReLU(inplace=True)) cannot
            # rebase the tensor whose gradient is taken below.
            return output.clone()
        return hook

    handles = [m.register_forward_hook(recorder(key)) for key, m in layers.items()]
    try:
        with torch.enable_grad():
            inputs = x.detach().requires_grad_(True) if x.is_floating_point() else x
            outputs = model(inputs)
            targets = sample_targets(outputs) if fisher_type == "true" else y
            loss = loss_fn(outputs, targets)
            recorded = [(key, inp, out) for key, calls in records.items() for inp, out in calls]
            wanted = [out for _, _, out in recorded if out.requires_grad]
            found = iter(torch.autograd.grad(loss, wanted, allow_unused=True) if wanted else ())
    finally:
        for h in handles:
            h.remove()
    for key, inp, out in recorded:
        grad = next(found) if out.requires_grad else None
        if grad is None:  # the layer does not influence the loss
            grad = torch.zeros_like(out)
        accumulators[key].add(inp, out.detach(), grad.detach(), x.shape[0])
