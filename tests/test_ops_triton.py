"""The Triton ops (interpreter on CPU, or a GPU) against the pure-PyTorch oracle ``naive``."""
import functools

import pytest
import torch
from oracles import refreshed_layers

from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.ops import coefficients, naive, prepare_constants, triton_ops, variant_code

pytestmark = pytest.mark.skipif(not triton_ops.AVAILABLE, reason=f"Triton unavailable: {triton_ops.REASON}")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = {"3x3": (5, 3, 3, 3), "5x3": (3, 5, 5, 3), "1x1": (7, 3, 1, 1), "7x7": (3, 3, 7, 7), "big": (20, 15, 3, 3)}
# (variant, beta): paper at 0.9 and projected at 0.1 mix gamma < 1 and gamma >= 1 layers in one stack
CASES = {0: ("paper", 1.0), 1: ("paper", 0.9), 2: ("projected", 0.1), 3: ("paper", 0.3), 4: ("projected", 0.3)}
NAMES = ("kernel", "s1", "direction", "s1_out", "gram", "consts")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: with 2 threads on a busy 2-core machine the input builder ran 100x slower (2.5 s vs 0.01 s)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _stack(n_layers, shape, case, seed=0):
    """Realistic float64 op arguments (power-iteration kernels of random layers, reflect padding: dense G)."""
    variant, beta = CASES[case]
    gen = torch.Generator().manual_seed(seed)
    size = (max(7, SHAPES[shape][2]), max(6, SHAPES[shape][3]))
    geometry = ConvGeometry.create(SHAPES[shape], size, padding=1, padding_mode="reflect")
    kernels, s1s, s1_outs = (list(x) for x in refreshed_layers(geometry, n_layers, variant, beta, gen))
    flat = lambda xs: torch.stack(xs).flatten(-2).flatten(1, 2)  # noqa: E731  (L, M, T)
    code = variant_code(variant, beta)
    direction, consts = prepare_constants(flat(s1s), flat(s1_outs), geometry.kernel_gram_pinv(), code)
    h, w = geometry.output_size
    tensors = (flat(kernels), flat(s1s), direction, flat(s1_outs), geometry.kernel_gram(), consts)
    scalars = (1.7, beta * geometry.full_rank, float(h * w), 1e-12, code)
    grad = torch.randn(tensors[0].shape, dtype=torch.float64, generator=gen)
    return tensors, scalars, grad


def _strided(x):
    """``x``'s values in a non-contiguous view (transposed, offset slice of a larger buffer)."""
    buf = x.new_zeros([n + 1 for n in reversed(x.shape)]).permute(*reversed(range(x.dim())))
    return buf[tuple(slice(1, n + 1) for n in x.shape)].copy_(x)


def _reference(tensors, scalars, grad):
    out, stats = naive.reweight_forward(*tensors, *scalars)
    return out, stats, naive.reweight_backward(grad, *tensors, stats, *scalars)


def _triton(tensors, scalars, grad):
    kernel = _strided(tensors[0].to(DEVICE)).requires_grad_()
    others = [_strided(t.to(DEVICE)) for t in tensors[1:]]
    assert not kernel.is_contiguous() and not others[-1].is_contiguous()
    out, stats = triton_ops.reweight_forward(kernel, *others, *scalars)
    assert out.dtype == kernel.dtype and not stats.requires_grad
    (grad_kernel,) = torch.autograd.grad(out, kernel, _strided(grad.to(DEVICE)))
    return out.detach().cpu(), stats.cpu(), grad_kernel.cpu()


def _params(Ls, shapes, cases, dtypes):
    return [pytest.param(L, shape, case, dtype, id=f"L{L}-M{_m(shape)}-T{_t(shape)}-v{variant_code(*CASES[case])}"
                         f"-b{CASES[case][1]}-{str(dtype).removeprefix('torch.')}")
            for L in Ls for shape in shapes for case in cases for dtype in dtypes]


def _m(shape):
    return SHAPES[shape][0] * SHAPES[shape][1]


def _t(shape):
    return SHAPES[shape][2] * SHAPES[shape][3]


EXACT = (_params([3], ["3x3", "5x3", "1x1"], CASES, [torch.float32, torch.float64])
         + _params([1], ["3x3"], [1, 2], [torch.float32, torch.float64])
         + _params([1], ["big"], [2], [torch.float32, torch.float64])  # M > BLOCK_M: several tiles per layer
         + _params([3], ["7x7"], [2], [torch.float32, torch.float64])
         + _params([12], ["1x1"], [2], [torch.float32]) + _params([12], ["3x3"], [1], [torch.float64]))
# Errors are measured against each output's scale (stats: per column; grad: at least |g| |out| / |K|,
# since grad can cancel to ~0). float32: the pure-PyTorch op in float32 reaches 3e-5 elementwise too.
TOL = {torch.float64: dict(rtol=1e-10, atol=1e-12), torch.float32: dict(rtol=5e-5, atol=5e-6)}


def _scales(expected, kernel, grad):
    out, stats, grad_kernel = expected
    grad_scale = torch.maximum(grad_kernel.abs().max(), grad.abs().max() * out.abs().max() / kernel.abs().max())
    return [x.clamp_min(torch.finfo(torch.float64).tiny) for x in (out.abs().max(), stats.abs().amax(0), grad_scale)]


@pytest.mark.parametrize("L,shape,case,dtype", EXACT)
def test_forward_backward_match_reference(L, shape, case, dtype):
    _check_exact(*_stack(L, shape, case), dtype)


@pytest.mark.parametrize("case", (0, 1, 2))
def test_large_eps_matches_reference(case):
    """With eps ~ 1e-12 the output is scale-invariant in K and some VJP terms cancel (d = s); eps = 0.5 exposes them."""
    tensors, scalars, grad = _stack(3, "3x3", case)
    _check_exact(tensors, scalars[:3] + (0.5,) + scalars[4:], grad, torch.float64)


def _check_exact(tensors, scalars, grad, dtype):
    tensors, grad = [t.to(dtype).double() for t in tensors], grad.to(dtype).double()  # the oracle: rounded inputs
    expected = _reference(tensors, scalars, grad)
    results = _triton([t.to(dtype) for t in tensors], scalars, grad.to(dtype))
    for got, want, scale in zip(results, expected, _scales(expected, tensors[0], grad)):
        torch.testing.assert_close(got.double() / scale, want / scale, **TOL[dtype])


@pytest.mark.parametrize("L,shape,case,dtype", _params([3], ["3x3", "1x1"], [0, 1, 2], [torch.float16, torch.bfloat16]))
def test_low_precision_error_within_twice_float32_reference(L, shape, case, dtype):
    tensors, scalars, grad = _stack(L, shape, case)
    tensors, grad = [t.to(dtype) for t in tensors], grad.to(dtype)
    expected = _reference([t.double() for t in tensors], scalars, grad.double())
    baseline = _reference([t.float() for t in tensors], scalars, grad.float())
    baseline = (baseline[0].to(dtype), baseline[1], baseline[2].to(dtype))  # out/grad in dtype, stats in float32
    scales = _scales(expected, tensors[0].double(), grad.double())
    results = _triton(tensors, scalars, grad)
    for name, got, base, want, scale in zip(("out", "stats", "grad"), results, baseline, expected, scales):
        assert got.dtype == base.dtype, name
        err, err_base = ((got.double() - want) / scale).abs().max(), ((base.double() - want) / scale).abs().max()
        assert err <= 2 * err_base + 1e-5, f"{name}: {err:.3g} vs float32 reference {err_base:.3g} (relative to scale)"


def test_cases_cover_both_gamma_regimes():
    """gamma >= 1 exactly where B = 0: the paper and projected cases must each hold both kinds of layers."""
    for code, cases in ((1, [1, 3]), (2, [2, 4])):
        regimes = set()
        for case in cases:
            for shape in ("3x3", "5x3", "1x1"):
                (kernel, s1, direction, s1_out, gram, consts), scalars, _ = _stack(3, shape, case)
                _, stats = naive.reweight_forward(kernel, s1, direction, s1_out, gram, consts, *scalars)
                _, b = coefficients(*stats.unbind(1), *consts.unbind(1), *scalars)
                regimes |= set((b == 0).tolist())
        assert regimes == {True, False}, f"variant {code}"


@pytest.mark.parametrize("L,N,dtype", [(1, 135, torch.float64), (3, 31, torch.float32), (12, 45, torch.float64),
                                       (3, 5000, torch.float32), (3, 135, torch.float16), (3, 135, torch.bfloat16)],
                         ids=lambda v: str(v).removeprefix("torch."))
def test_normalize_segments_matches_reference(L, N, dtype):
    gen = torch.Generator().manual_seed(L)
    x = torch.randn(L, N + 2, dtype=torch.float64, generator=gen)[:, 1:-1].to(dtype)
    x[L // 2] = 0.0  # falls back
    fallback = torch.randn(N, L, dtype=torch.float64, generator=gen).t().to(dtype)
    got = triton_ops.normalize_segments(_strided(x).to(DEVICE), fallback.to(DEVICE), 1e-12).cpu()
    assert got.dtype == dtype and torch.equal(got[L // 2], fallback[L // 2])
    want = naive.normalize_segments(x.double(), fallback.double(), 1e-12)
    if dtype in TOL:
        torch.testing.assert_close(got.double(), want, **TOL[dtype])
    else:
        base = naive.normalize_segments(x.float(), fallback.float(), 1e-12).to(dtype)
        assert (got.double() - want).abs().max() <= 2 * (base.double() - want).abs().max() + 1e-5


@pytest.mark.parametrize("P,L,M,dtype", [(33, 5, 7, torch.float64), (300, 2, 3, torch.float32), (2, 4, 1000, torch.float32),
                                         (17, 3, 5, torch.bfloat16)], ids=lambda v: str(v).removeprefix("torch."))
def test_normalize_segments_rows_layout(P, L, M, dtype):
    """(P, L, M): segment l is x[:, l, :] (a channels-last stack)."""
    gen = torch.Generator().manual_seed(P)
    x = torch.randn(P, L, M, dtype=torch.float64, generator=gen).to(dtype)
    x[:, L // 2] = 0.0
    fallback = torch.randn(P, L, M, dtype=torch.float64, generator=gen).to(dtype)
    got = triton_ops.normalize_segments(_strided(x).to(DEVICE), fallback.to(DEVICE), 1e-12).cpu()
    assert got.dtype == dtype and torch.equal(got[:, L // 2], fallback[:, L // 2])
    segments = x.double().transpose(0, 1).reshape(L, -1)
    explicit = (segments / segments.norm(dim=1, keepdim=True)).reshape(L, P, M).transpose(0, 1)
    explicit[:, L // 2] = fallback[:, L // 2].double()
    if dtype in TOL:
        torch.testing.assert_close(got.double(), explicit, **TOL[dtype])
    else:
        base = naive.normalize_segments(x.float(), fallback.float(), 1e-12).to(dtype)
        assert (got.double() - explicit).abs().max() <= 2 * (base.double() - explicit).abs().max() + 1e-5


def _small_args(variant=2, L=2, dtype=torch.float64):
    tensors, scalars, grad = _stack(L, "3x3", variant)  # case i has variant i
    return [t.to(DEVICE, dtype) for t in tensors], scalars, grad.to(DEVICE, dtype)


@pytest.mark.parametrize("variant", (1, 2))
def test_opcheck(variant):
    tensors, scalars, grad = _small_args(variant)
    kernel = tensors[0].clone().requires_grad_()
    torch.library.opcheck(torch.ops.srnc_ext_triton.reweight_forward.default, (kernel, *tensors[1:], *scalars))
    _, stats = naive.reweight_forward(*tensors, *scalars)
    torch.library.opcheck(torch.ops.srnc_ext_triton.reweight_backward.default, (grad, *tensors, stats, *scalars))
    for x in (torch.randn(3, 7, dtype=torch.float64, device=DEVICE), torch.randn(4, 3, 5, dtype=torch.float64, device=DEVICE)):
        torch.library.opcheck(torch.ops.srnc_ext_triton.normalize_segments.default, (x, torch.ones_like(x), 1e-12))


def test_torch_compile_fullgraph_matches_eager():
    tensors, scalars, grad = _small_args(2, dtype=torch.float32)

    def loss(kernel):
        out, stats = triton_ops.reweight_forward(kernel, *tensors[1:], *scalars)
        return (out * grad).sum() + stats[:, 0].sum().detach()

    results = []
    for fn in (loss, torch.compile(loss, fullgraph=True)):
        kernel = tensors[0].clone().requires_grad_()
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
def test_bad_inputs_name_the_argument(name, mutate):
    tensors, scalars, _ = _small_args()
    args = dict(zip(NAMES + ("alpha", "beta_rank", "positions", "eps", "variant"), (*tensors, *scalars)))
    args[name] = mutate(args)
    with pytest.raises((ValueError, RuntimeError), match=name):
        triton_ops.reweight_forward(**args)


def test_bad_backward_and_normalize_inputs_name_the_argument():
    tensors, scalars, grad = _small_args()
    stats = torch.zeros(2, 3, dtype=torch.float64, device=DEVICE)
    with pytest.raises(ValueError, match="stats"):
        triton_ops.reweight_backward(grad, *tensors, stats[:, :2], *scalars)
    with pytest.raises(ValueError, match="grad"):
        triton_ops.reweight_backward(grad[:1], *tensors, stats, *scalars)
    x = torch.randn(3, 7, device=DEVICE)
    with pytest.raises(ValueError, match="fallback"):
        triton_ops.normalize_segments(x, x[:, :-1], 1e-12)
