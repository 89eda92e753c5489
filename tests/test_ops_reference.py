"""The coefficient form of the stacked ops against the per-layer autograd reference."""
import pytest
import torch
from op_harness import op_case

from srnc_ext import reference
from srnc_ext.ops import coefficients, coefficients_vjp
from srnc_ext.ops.naive import normalize_segments, reweight_backward, reweight_forward

CASES = [("projected", 1.0), ("projected", 0.3), ("projected", 0.02), ("paper", 0.3), ("paper", 0.02), ("paper", 1.0)]


@pytest.mark.parametrize("variant,beta", CASES, ids=[f"{v}-b{b}" for v, b in CASES])
@pytest.mark.parametrize("padding_mode", ("zeros", "reflect"))
def test_stacked_forward_and_backward_match_per_layer_reference(variant, beta, padding_mode):
    c = op_case(3, "3x2", "sn" if beta >= 1.0 else variant, None if beta >= 1.0 else beta, padding_mode)
    geometry, scalars = c.geometry, c.scalars
    layers = lambda x: x.reshape(3, *geometry.weight_shape)  # noqa: E731  (L, C_out, C_in, kh, kw)
    kernels, s1, s1_out = (layers(c.tensors[k]) for k in ("kernel", "s1", "s1_out"))
    alpha, eps = scalars["alpha"], scalars["eps"]
    k = kernels.clone().requires_grad_()
    expected = torch.stack([
        reference.srnc_weight(k[i], s1[i], geometry, alpha=alpha, beta=beta, eps=eps, variant=variant, s1_out=s1_out[i])
        for i in range(3)
    ])
    grad = layers(c.grad)
    (expected * grad).sum().backward()
    out, stats = reweight_forward(**c.tensors, **scalars)
    torch.testing.assert_close(out.view_as(expected), expected.detach(), rtol=1e-10, atol=1e-12)
    grad_k = reweight_backward(c.grad, **c.tensors, stats=stats, **scalars)
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
