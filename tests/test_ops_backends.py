"""Every fast backend of the stacked ops (compiled CPU, compiled CUDA, Triton) against the
pure-PyTorch oracle ``srnc_ext.ops.naive``, on the shared inputs and tolerances of ``op_harness``.

float64 and float32 are compared with the float64 oracle on the same (rounded) inputs; float16 and
bfloat16 follow the low-precision rule (``op_harness.assert_low_precision``). The compiled CUDA
kernels run under the ``gpu`` marker; Triton runs on a GPU, else through its interpreter on CPU.
Every forward/backward case runs twice: without the floor and with ``floor`` (tau) between the
layers' sigma estimates (``op_harness.floored``), and near-zero kernels (all below the floor) have
their own cases.
"""
import pytest
import torch
from op_harness import (BACKENDS, DTYPES, EPS, F64, LAYOUTS, LOW, TENSORS, TRITON, assert_low_precision,
                        assert_matches, below_floor, dtype_id, floored, op_case, oracle, reweighted_layers, run_op,
                        scales, strided)

from srnc_ext.ops import naive

# op_case arguments (L, shape, variant, beta, padding_mode).
# Straddling: beta_rank splits each stack at gamma = 1; zero padding; contiguous inputs.
STRADDLING = [(L, shape, variant, None, "zeros")
              for L, shape in [(1, "3x3"), (3, "5x3"), (3, "1x1"), (12, "3x3"), (12, "5x3"), (12, "1x1"), (3, "big3x3")]
              for variant in ("sn", "paper", "projected")]
# Fixed beta, reflect padding (a dense G), non-contiguous inputs: paper at 0.9 and projected at 0.1
# mix gamma < 1 and gamma >= 1 layers in one stack.
FIXED_BETAS = [("sn", None), ("paper", 0.9), ("projected", 0.1), ("paper", 0.3), ("projected", 0.3)]
FIXED = ([(3, shape, v, b, "reflect") for shape in ("3x3", "5x3", "1x1") for v, b in FIXED_BETAS]
         + [(1, "3x3", "paper", 0.9, "reflect"), (1, "3x3", "projected", 0.1, "reflect"),
            (1, "big3x3", "projected", 0.1, "reflect"), (3, "7x7", "projected", 0.1, "reflect"),
            (12, "1x1", "projected", 0.1, "reflect"), (12, "3x3", "paper", 0.9, "reflect")])
FIXED_LOW = [(3, shape, v, b, "reflect") for shape in ("3x3", "1x1") for v, b in FIXED_BETAS[:3]]


def _matrix(backend):
    """(case, dtype) pairs for ``backend``: every case in every dtype, except for Triton through its
    interpreter (0.2-0.4 s a case on this 2-core CPU): the fixed cases in float32/float64, six of them in
    float16/bfloat16, and the straddling stacks of three 5x3 layers in every dtype."""
    if backend is TRITON and TRITON.device == "cpu":
        return ([(c, d) for c in FIXED for d in (torch.float32, F64)] + [(c, d) for c in FIXED_LOW for d in LOW]
                + [(c, d) for c in STRADDLING if c[:2] == (3, "5x3") for d in DTYPES])
    return [(c, d) for c in STRADDLING + FIXED for d in DTYPES]


def _case_id(case):
    L, shape, variant, beta, padding_mode = case
    target = "b1" if variant == "sn" else "straddle" if beta is None else f"b{beta}"
    return f"L{L}-{shape}-{variant}-{target}-{padding_mode}"


FORWARD_BACKWARD = [pytest.param(param.values[0], case, dtype, floor,
                                 id=f"{param.id}-{_case_id(case)}-{dtype_id(dtype)}{'-floor' if floor else ''}",
                                 marks=param.marks)
                    for param in BACKENDS for case, dtype in _matrix(param.values[0]) for floor in (False, True)]


@pytest.mark.parametrize("backend,case,dtype,floor", FORWARD_BACKWARD)
def test_forward_backward_match_oracle(backend, case, dtype, floor):
    """``floor``: with the floor between the layers' sigma estimates (``op_harness.floored``)."""
    c = floored(op_case(*case)) if floor else op_case(*case)
    layout = None if case in STRADDLING else "offset"
    inputs, grad = c.cast(dtype, backend.device, layout), c.grad.to(backend.device, dtype)
    if layout is not None:
        grad = strided(grad, layout)
        assert not inputs["kernel"].is_contiguous() and not inputs["consts"].is_contiguous() and not grad.is_contiguous()
    got = run_op(backend.ops, inputs, c.scalars, grad)
    assert [g.dtype for g in got] == [dtype, F64 if dtype == F64 else torch.float32, dtype]
    rounded, grad_rounded = {k: v.cpu().to(F64) for k, v in inputs.items()}, grad.cpu().to(F64)
    expected = oracle(rounded, c.scalars, grad_rounded)
    scale = scales(expected, rounded["kernel"], grad_rounded)
    if dtype in LOW:
        exact = oracle(c.tensors, c.scalars, c.grad)
        baseline = oracle(inputs, c.scalars, grad, torch.float32)  # float32 math on the rounded inputs
        baseline = (baseline[0].to(dtype), baseline[1], baseline[2].to(dtype))
        for name, g, e, r, b, s in zip(("out", "stats", "grad_kernel"), got, exact, expected, baseline, scale):
            assert_low_precision(g, e, r, b, s, name)
    else:
        for name, g, e, s in zip(("out", "stats", "grad_kernel"), got, expected, scale):
            assert_matches(g, e, dtype, s, name)


@pytest.mark.parametrize("variant,beta", FIXED_BETAS[:3], ids=lambda v: str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_large_eps_matches_oracle(backend, variant, beta):
    """With eps ~ 1e-12 the output is scale-invariant in K and some VJP terms cancel (d = s); eps = 0.5 exposes them."""
    c = op_case(3, "3x3", variant, beta, "reflect").with_scalars(eps=0.5)
    got = run_op(backend.ops, c.cast(F64, backend.device, "offset"), c.scalars, strided(c.grad.to(backend.device)))
    expected = oracle(c.tensors, c.scalars, c.grad)
    for name, g, e, s in zip(("out", "stats", "grad_kernel"), got, expected, scales(expected, c.tensors["kernel"], c.grad)):
        assert_matches(g, e, F64, s, name)


def test_floored_cases_cover_both_floor_regimes():
    """Each floored stack of more than one layer holds layers below the floor and above it."""
    for case in STRADDLING + FIXED:
        below = below_floor(floored(op_case(*case)))
        assert below.all() if case[0] == 1 else set(below.tolist()) == {True, False}, case


# near-zero kernels (a zero-initialized layer, and early in its training): all layers below the floor
NEAR_ZERO = [(variant, dtype, scale) for variant in ("sn", "paper", "projected") for dtype in (F64, torch.float32)
             for scale in (0.0, 1e-3, 1e-12, 1e-18)]


@pytest.mark.parametrize("variant,dtype,scale", NEAR_ZERO,
                         ids=lambda v: dtype_id(v) if isinstance(v, torch.dtype) else str(v))
@pytest.mark.parametrize("backend", BACKENDS)
def test_near_zero_kernels_below_the_floor_match_oracle(backend, variant, dtype, scale):
    c = op_case(3, "5x3", variant, 0.3 if variant == "paper" else 0.1 if variant == "projected" else None, "reflect")
    tensors = {**c.tensors, "kernel": c.tensors["kernel"] * scale}
    c = type(c)(c.geometry, tensors, {**c.scalars, "floor": c.scalars["alpha"]}, c.grad)
    inputs, grad = c.cast(dtype, backend.device, "offset"), strided(c.grad.to(backend.device, dtype))
    got = run_op(backend.ops, inputs, c.scalars, grad)
    rounded = {k: v.cpu().to(F64) for k, v in inputs.items()}
    expected = oracle(rounded, c.scalars, grad.cpu().to(F64))
    assert all(torch.isfinite(g).all() for g in got)
    scale_out, scale_stats, _ = scales(expected, rounded["kernel"], grad.cpu().to(F64)) if scale else (1.0, 1.0, 1.0)
    grad_scale = c.scalars["alpha"] / c.scalars["floor"] * grad.abs().max().cpu().to(F64)  # |dL/dK| <~ alpha/tau |g|
    for name, g, e, s in zip(("out", "stats", "grad_kernel"), got, expected, (scale_out, scale_stats, grad_scale)):
        assert_matches(g, e, dtype, s, name)


def test_cases_cover_both_gamma_regimes():
    """gamma >= 1 exactly where B = 0: each straddling stack holds both kinds of layers (op_case checks
    it), and so do the fixed paper and projected cases of each variant taken together."""
    for case in STRADDLING:
        if case[0] > 1 and case[2] != "sn":
            assert set(reweighted_layers(op_case(*case)).tolist()) == {True, False}, case
    for variant in ("paper", "projected"):
        regimes = set()
        for case in FIXED:
            if case[0] == 3 and case[1] in ("3x3", "5x3", "1x1") and case[2] == variant:
                regimes |= set(reweighted_layers(op_case(*case)).tolist())
        assert regimes == {True, False}, variant


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("variant", ("sn", "paper", "projected"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend, variant, layout):
    c = op_case(3, "5x3", variant)
    inputs = c.cast(F64, backend.device, layout)
    grad = strided(c.grad.to(backend.device), layout)
    assert not any(v.is_contiguous() for v in inputs.values()) and not grad.is_contiguous()
    out, stats, grad_kernel = run_op(backend.ops, inputs, c.scalars, grad)
    assert out.is_contiguous() and grad_kernel.is_contiguous()
    for g, e in zip((out, stats, grad_kernel), oracle(c.tensors, c.scalars, c.grad)):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-12)
    direct = backend.ops.reweight_backward(grad, **inputs, stats=strided(stats, layout), **c.scalars)
    torch.testing.assert_close(direct, grad_kernel, rtol=0, atol=0)


def _check_normalized(got, x, fallback, eps, dtype, explicit=None):
    """``got`` against the oracle on the rounded inputs (and, for float16/bfloat16, the low-precision
    rule against the oracle on the exact ones too); ``explicit``: the expected values computed another
    way from the exact inputs, which the oracle must match first."""
    rx, rf = x.to(dtype).to(F64), fallback.to(dtype).to(F64)
    rounded = naive.normalize_segments(rx, rf, eps)
    if explicit is not None and dtype not in LOW:  # the oracle itself, on the rounded inputs
        close = dict(rtol=1e-6, atol=1e-7) if dtype == torch.float32 else dict(rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(rounded, explicit(rx, rf), **close)
    scale = rounded.abs().max()
    if dtype in LOW:
        baseline = naive.normalize_segments(rx.float(), rf.float(), eps).to(dtype)
        exact = naive.normalize_segments(x, fallback, eps) if explicit is None else explicit(x, fallback)
        assert_low_precision(got, exact, rounded, baseline, scale, "normalize_segments")
    else:
        assert_matches(got, rounded, dtype, scale, "normalize_segments")


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_segments_fallback_below_eps(backend, dtype):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 37, dtype=F64, generator=gen) * torch.tensor([[1.0], [3.0], [0.0], [1e-3], [1e-9]], dtype=F64)
    fallback = torch.randn(5, 37, dtype=F64, generator=gen)
    eps = 1e-6  # row 4 (norm ~ 6e-9) and the zero row 2 take the fallback
    got = backend.ops.normalize_segments(strided(x.to(backend.device, dtype), "transposed"),
                                         fallback.to(backend.device, dtype), eps)
    assert got.dtype == dtype and got.shape == x.shape
    _check_normalized(got, x, fallback, eps, dtype)
    torch.testing.assert_close(got[[2, 4]].cpu(), fallback[[2, 4]].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("L,N,dtype", [(1, 135, F64), (3, 31, torch.float32), (12, 45, F64), (3, 5000, torch.float32),
                                       (3, 135, torch.float16), (3, 135, torch.bfloat16)], ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_segments_rows(backend, L, N, dtype):
    """(L, N) rows, both arguments non-contiguous (a column slice and a transpose), a zero row falling back."""
    gen = torch.Generator().manual_seed(L)
    x = torch.randn(L, N + 2, dtype=F64, generator=gen)[:, 1:-1]
    x[L // 2] = 0.0
    fallback = torch.randn(N, L, dtype=F64, generator=gen).t()
    got = backend.ops.normalize_segments(strided(x.to(backend.device, dtype)), fallback.to(backend.device, dtype), EPS)
    assert got.dtype == dtype and torch.equal(got[L // 2].cpu(), fallback[L // 2].to(dtype))
    _check_normalized(got, x, fallback, EPS, dtype)


def _explicit_rows_layout(x, fallback):
    """Segment l of a (P, L, M) stack is x[:, l, :]: normalized as one vector, zero ones replaced."""
    P, L, M = x.shape
    segments = x.transpose(0, 1).reshape(L, -1)
    norms = segments.norm(dim=1)
    explicit = (segments / norms.clamp_min(1e-300)[:, None]).reshape(L, P, M).transpose(0, 1).clone()
    explicit[:, norms == 0] = fallback[:, norms == 0]
    return explicit


ROWS_LAYOUT = [(P, L, M, dtype) for P, L, M in [(1, 3, 37), (33, 5, 7), (300, 2, 3), (2, 4, 1000)] for dtype in DTYPES]
ROWS_LAYOUT.append((17, 3, 5, torch.bfloat16))


@pytest.mark.parametrize("P,L,M,dtype", ROWS_LAYOUT, ids=dtype_id)
@pytest.mark.parametrize("backend", BACKENDS)
def test_normalize_segments_rows_layout(backend, P, L, M, dtype):
    """(P, L, M): segment l is x[:, l, :] (a channels-last stack); agrees with the explicit per-segment norm."""
    gen = torch.Generator().manual_seed(P * L)
    x = torch.randn(P, L, M, dtype=F64, generator=gen) * torch.linspace(0.5, 3.0, L, dtype=F64)[:, None]
    x[:, L // 2] = 0.0  # falls back
    fallback = torch.randn(P, L, M, dtype=F64, generator=gen)
    got = backend.ops.normalize_segments(strided(x.to(backend.device, dtype)), fallback.to(backend.device, dtype), EPS)
    assert got.dtype == dtype and got.shape == x.shape
    _check_normalized(got, x, fallback, EPS, dtype, explicit=_explicit_rows_layout)
    torch.testing.assert_close(got[:, L // 2].cpu(), fallback[:, L // 2].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("floor", (False, True), ids=("no-floor", "floor"))
@pytest.mark.parametrize("variant", ("paper", "projected"))
@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend, variant, floor):
    c = floored(op_case(3, "3x3", variant)) if floor else op_case(3, "3x3", variant)
    tensors = c.cast(F64, backend.device)
    kernel = tensors["kernel"].clone().requires_grad_()
    scalars = list(c.scalars.values())
    torch.library.opcheck(backend.torch_op("reweight_forward").default, (kernel, *list(tensors.values())[1:], *scalars))
    _, stats = naive.reweight_forward(**tensors, **c.scalars)
    grad = c.grad.to(backend.device)
    torch.library.opcheck(backend.torch_op("reweight_backward").default, (grad, *tensors.values(), stats, *scalars))
    for x in (torch.randn(4, 9, dtype=F64), torch.randn(5, 3, 4, dtype=F64)):
        x = x.to(backend.device)
        torch.library.opcheck(backend.torch_op("normalize_segments").default, (x, torch.randn_like(x), 1e-12))


@pytest.mark.parametrize("backend", BACKENDS)
def test_stats_not_differentiable_and_constants_get_no_gradient(backend):
    c = op_case(3, "3x3", "paper")
    t = {k: v.requires_grad_() for k, v in c.cast(F64, backend.device).items()}
    out, stats = backend.ops.reweight_forward(**t, **c.scalars)
    assert out.requires_grad and not stats.requires_grad
    grads = torch.autograd.grad(out, list(t.values()), c.grad.to(backend.device), allow_unused=True)
    assert grads[0] is not None and all(g is None or not g.any() for g in grads[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_compile_fullgraph_matches_eager(backend):
    c = op_case(2, "3x3", "projected", 0.1, "reflect")
    tensors, grad = c.cast(torch.float32, backend.device), c.grad.to(backend.device, torch.float32)
    others = [tensors[k] for k in TENSORS[1:]]
    ops = backend.ops

    def loss(kernel):
        out, stats = ops.reweight_forward(kernel, *others, *c.scalars.values())
        return (out * grad).sum() + stats[:, 0].sum().detach()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        kernel = tensors["kernel"].clone().requires_grad_()
        value = fn(kernel)
        results.append((value.detach(), torch.autograd.grad(value, kernel)[0]))
    torch.testing.assert_close(results[1], results[0])


BAD = [
    ("kernel", lambda a: a["kernel"][0]),
    ("s1", lambda a: a["s1"][:, :-1]),
    ("direction", lambda a: a["direction"].float()),
    ("s1_out", lambda a: a["s1_out"].to("meta")),
    ("gram", lambda a: a["gram"][:-1]),
    ("consts", lambda a: torch.cat([a["consts"], a["consts"][:, :1]], 1)),
    ("variant", lambda a: 3),
]


@pytest.mark.parametrize("name,mutate", BAD, ids=[b[0] for b in BAD])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_name_the_argument(backend, name, mutate):
    c = op_case(2, "3x3", "projected")
    args = {**c.cast(F64, backend.device), **c.scalars}
    args[name] = mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        backend.ops.reweight_forward(**args)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_backward_and_normalize_inputs_name_the_argument(backend):
    c = op_case(2, "3x3", "projected")
    tensors, grad = c.cast(F64, backend.device), c.grad.to(backend.device)
    stats = torch.zeros(2, 3, dtype=F64, device=backend.device)
    with pytest.raises(ValueError, match="stats"):
        backend.ops.reweight_backward(grad, **tensors, stats=stats[:, :2], **c.scalars)
    with pytest.raises(ValueError, match="grad"):
        backend.ops.reweight_backward(grad[:1], **tensors, stats=stats, **c.scalars)
    x = torch.randn(3, 7, device=backend.device)
    with pytest.raises(ValueError, match="fallback"):
        backend.ops.normalize_segments(x, x[:, :-1], 1e-12)

