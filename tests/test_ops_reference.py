"""The coefficient form of the stacked ops against the per-layer autograd reference."""
import pytest
import torch
from oracles import refreshed_layers

from srnc_ext import reference
from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.ops import coefficients, coefficients_vjp, prepare_constants, variant_code
from srnc_ext.ops.naive import normalize_segments, reweight_backward, reweight_forward


def _stack(n_layers, variant, beta, padding_mode="zeros", seed=0, shape=(5, 3, 3, 2), size=(7, 6)):
    geometry = ConvGeometry.create(shape, size, padding=1, padding_mode=padding_mode)
    return (geometry, *refreshed_layers(geometry, n_layers, variant, beta, torch.Generator().manual_seed(seed)))


def _op_args(geometry, s1, s1_out, variant, beta):
    code = variant_code(variant, beta)
    L, T = s1.shape[0], s1.shape[-1] * s1.shape[-2]
    flat = lambda x: x.reshape(L, -1, T)  # noqa: E731
    gram = geometry.kernel_gram()
    direction, consts = prepare_constants(flat(s1), flat(s1_out), geometry.kernel_gram_pinv(), code)
    h, w = geometry.output_size
    return flat, code, gram, direction, consts, beta * geometry.full_rank, float(h * w)


CASES = [("projected", 1.0), ("projected", 0.3), ("projected", 0.02), ("paper", 0.3), ("paper", 0.02), ("paper", 1.0)]


@pytest.mark.parametrize("variant,beta", CASES, ids=[f"{v}-b{b}" for v, b in CASES])
@pytest.mark.parametrize("padding_mode", ("zeros", "reflect"))
def test_stacked_forward_and_backward_match_per_layer_reference(variant, beta, padding_mode):
    geometry, kernels, s1, s1_out = _stack(3, variant, beta, padding_mode)
    flat, code, gram, direction, consts, beta_rank, positions = _op_args(geometry, s1, s1_out, variant, beta)
    alpha, eps = 1.7, 1e-12
    k = kernels.clone().requires_grad_()
    expected = torch.stack([
        reference.srnc_weight(k[i], s1[i], geometry, alpha=alpha, beta=beta, eps=eps, variant=variant, s1_out=s1_out[i])
        for i in range(3)
    ])
    grad = torch.randn_like(expected)
    (expected * grad).sum().backward()
    out, stats = reweight_forward(flat(kernels), flat(s1), direction, flat(s1_out), gram, consts,
                                  alpha, beta_rank, positions, eps, code)
    torch.testing.assert_close(out.view_as(expected), expected.detach(), rtol=1e-10, atol=1e-12)
    grad_k = reweight_backward(flat(grad), flat(kernels), flat(s1), direction, flat(s1_out), gram, consts, stats,
                               alpha, beta_rank, positions, eps, code)
    torch.testing.assert_close(grad_k.view_as(k), k.grad, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("code", (0, 1, 2))
def test_hand_written_vjp_matches_autograd(code):
    gen = torch.Generator().manual_seed(code)
    L = 64
    s = (0.5 + torch.rand(L, dtype=torch.float64, generator=gen)).requires_grad_()
    q = (20 + 50 * torch.rand(L, dtype=torch.float64, generator=gen)).requires_grad_()
    p = (0.5 + torch.rand(L, dtype=torch.float64, generator=gen)).requires_grad_()
    c0 = 0.5 + torch.rand(L, dtype=torch.float64, generator=gen)
    c1 = torch.rand(L, dtype=torch.float64, generator=gen)
    beta_rank = 30.0  # gamma straddles 1 across the batch
    a, b = coefficients(s, q, p, c0, c1, 1.3, beta_rank, 49.0, 1e-12, code)
    g_a, g_b = torch.randn(L, dtype=torch.float64, generator=gen), torch.randn(L, dtype=torch.float64, generator=gen)
    expected = torch.autograd.grad((a * g_a + b * g_b).sum(), (s, q, p), allow_unused=True, materialize_grads=True)
    got = coefficients_vjp(s.detach(), q.detach(), p.detach(), c0, c1, g_a, g_b, 1.3, beta_rank, 49.0, 1e-12, code)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12)


def test_normalize_segments_rows_and_fallback():
    x = torch.randn(4, 10, dtype=torch.float64)
    x[2] = 0.0
    fallback = torch.randn(4, 10, dtype=torch.float64)
    out = normalize_segments(x, fallback, 1e-12)
    torch.testing.assert_close(out[[0, 1, 3]].norm(dim=1), torch.ones(3, dtype=torch.float64))
    torch.testing.assert_close(out[2], fallback[2])


def test_normalize_segments_rows_layout_is_a_permuted_row_layout():
    """(P, L, M) with segment l = x[:, l, :] equals the (L, P*M) rows of the permuted tensor."""
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    x[:, 1] = 0.0
    fallback = torch.randn(6, 4, 5, dtype=torch.float64)
    out = normalize_segments(x, fallback, 1e-12)
    rows = normalize_segments(x.transpose(0, 1).reshape(4, -1), fallback.transpose(0, 1).reshape(4, -1), 1e-12)
    torch.testing.assert_close(out, rows.reshape(4, 6, 5).transpose(0, 1), rtol=1e-14, atol=1e-15)
    with pytest.raises(ValueError, match="x must be \\(L, N\\) or \\(P, L, M\\)"):
        normalize_segments(x[0, 0], fallback[0, 0], 1e-12)
