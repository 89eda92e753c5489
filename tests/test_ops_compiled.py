"""The compiled ops (``srnc_ext._C``, csrc/) against the pure-PyTorch oracle ``srnc_ext.ops.naive``.

float64 and float32 are compared tightly with the float64 oracle on the same inputs. float16 and
bfloat16 follow the low-precision rule: the op's error against the float64 oracle (on the
unrounded inputs) is at most twice the error of the oracle run in float32 on the rounded inputs
and rounded to the low dtype, plus a small atol.
"""
import contextlib
import functools
import os
import re
import subprocess

import pytest
import torch

from srnc_ext import reference
from srnc_ext.conv_operator import ConvGeometry
from srnc_ext.ops import compiled, naive

if not compiled.AVAILABLE:
    pytest.skip(f"srnc_ext._C is not built ({compiled.IMPORT_ERROR}); {compiled.REBUILD_HINT}", allow_module_level=True)

F64 = torch.float64
ALPHA, EPS = 1.7, 1e-12
# (C_out, C_in, kh, kw), padding: odd channel counts, M*T from 5 to 5049
SHAPES = {
    "3x3": ((5, 3, 3, 3), 1),
    "5x3": ((3, 7, 5, 3), (2, 1)),
    "1x1": ((7, 5, 1, 1), 0),
    "big3x3": ((33, 17, 3, 3), 1),  # M*T > threads per CUDA block and > the CPU summation chunk
}
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")]),
]
LOW = (torch.float16, torch.bfloat16)
DTYPES = (torch.float64, torch.float32) + LOW


def _critical_beta_rank(stats, consts, positions, variant):
    """Per layer, the beta_rank at which gamma = 1 (gamma < 1 below it)."""
    s, q, _ = stats.unbind(1)
    d = s + EPS
    if variant == naive.VARIANT_PAPER:
        return 1.0 + positions * (q / (d * d) - 2.0 * s / d + consts[:, 0])
    return q / (d * d)  # projected: top + rest


@contextlib.contextmanager
def _one_thread():
    """Tiny convs gain nothing from threads and lose much when the other core is busy (seen here:
    23 ms instead of 0.02 ms per conv with 2 OpenMP threads)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def _case(L, shape_id, variant, seed=0):
    """float64 op inputs for L realistic layers, with beta_rank splitting the layers at gamma = 1."""
    with _one_thread():
        return _build_case(L, shape_id, variant, seed)


def _build_case(L, shape_id, variant, seed):
    shape, padding = SHAPES[shape_id]
    geometry = ConvGeometry.create(shape, (7, 6), padding=padding)
    gen = torch.Generator().manual_seed(seed)
    randn = lambda *size: torch.randn(*size, dtype=F64, generator=gen)  # noqa: E731
    kernels, s1s, s1_outs = [], [], []
    for _ in range(L):
        k = randn(shape)
        u, v = reference.power_iteration(k, randn(geometry.output_shape()), randn(geometry.input_shape()), geometry, 15, EPS)
        s1 = reference.rank_one_kernel(u, v, geometry)
        # the rank-one kernel of a nearby kernel stands in for the reweighted kernel's
        u2, v2 = reference.power_iteration(k + 0.2 * randn(shape), u, v, geometry, 15, EPS)
        kernels.append(k), s1s.append(s1), s1_outs.append(reference.rank_one_kernel(u2, v2, geometry))
    T = shape[2] * shape[3]
    kernel, s1, s1_out = (torch.stack(x).reshape(L, -1, T) for x in (kernels, s1s, s1_outs))
    gram = geometry.kernel_gram()
    direction, consts = naive.prepare_constants(s1, s1_out, geometry.kernel_gram_pinv(), variant)
    positions = float(geometry.output_size[0] * geometry.output_size[1])
    beta_rank = float(geometry.full_rank)
    if variant != naive.VARIANT_SN:
        _, stats = naive.reweight_forward(kernel, s1, direction, s1_out, gram, consts, ALPHA, beta_rank,
                                                 positions, EPS, variant)
        crit = _critical_beta_rank(stats, consts, positions, variant).sort().values.tolist()
        if L == 1:
            beta_rank = 0.5 * (crit[0] + (1.0 if variant == naive.VARIANT_PAPER else 0.0))
        else:  # split at the widest (relative) gap, far from gamma = 1 for every layer
            i = max(range(L - 1), key=lambda j: crit[j + 1] / crit[j])
            beta_rank = (crit[i] * crit[i + 1]) ** 0.5
        _, b = naive.coefficients(*stats.unbind(1), *consts.unbind(1), ALPHA, beta_rank, positions, EPS, variant)
        assert (b != 0).any() and (L == 1 or (b == 0).any()), "gamma must straddle 1 across the layers"
    tensors = dict(kernel=kernel, s1=s1, direction=direction, s1_out=s1_out, gram=gram, consts=consts)
    scalars = dict(alpha=ALPHA, beta_rank=beta_rank, positions=positions, eps=EPS, variant=variant)
    return tensors, scalars, randn(kernel.shape)


def _ref(tensors, scalars, grad, dtype=F64):
    """The oracle's (out, stats, grad_kernel) in ``dtype``."""
    t = {k: v.to(dtype) for k, v in tensors.items()}
    out, stats = naive.reweight_forward(**t, **scalars)
    return out, stats, naive.reweight_backward(grad.to(dtype), **t, stats=stats, **scalars)


def _op(tensors, scalars, grad):
    """The op's (out, stats, grad_kernel), the gradient through the op's autograd."""
    kernel = tensors["kernel"].detach().clone().requires_grad_()
    out, stats = torch.ops.srnc_ext.reweight_forward(**{**tensors, "kernel": kernel}, **scalars)
    (grad_kernel,) = torch.autograd.grad(out, kernel, grad)
    return out.detach(), stats, grad_kernel


def _assert_close(got, expected, dtype, baseline=None, what=""):
    """Tight for float64/float32; for float16/bfloat16, the low-precision rule against ``baseline``."""
    got, expected = got.cpu().to(F64), expected.cpu().to(F64)
    scale = expected.abs().max().item()
    if baseline is None:
        rtol = 1e-10 if dtype == F64 else 1e-5
        torch.testing.assert_close(got, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")
        return
    err = (got - expected).abs().max().item()
    base = (baseline.cpu().to(F64) - expected).abs().max().item()
    assert err <= 2 * base + 1e-3 * scale, f"{what}: error {err:.3g} > 2 x {base:.3g} (pure PyTorch at that precision)"


def _cast(tensors, dtype, device):
    return {k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("variant", (0, 1, 2), ids=("sn", "paper", "projected"))
@pytest.mark.parametrize("L,shape_id", [(1, "3x3"), (3, "5x3"), (3, "1x1"), (12, "3x3"), (12, "5x3"), (12, "1x1"),
                                         (3, "big3x3")], ids=lambda x: str(x))
def test_forward_backward_match_oracle(L, shape_id, variant, dtype, device):
    tensors, scalars, grad = _case(L, shape_id, variant)
    low = dtype in LOW
    inputs, grad_in = _cast(tensors, dtype, device), grad.to(device=device, dtype=dtype)
    got = _op(inputs, scalars, grad_in)
    rounded = {k: v.cpu() for k, v in inputs.items()}
    if low:  # against the float64 oracle on the exact inputs, bounded by float32 math on rounded ones
        expected = _ref(tensors, scalars, grad)
        baseline = _ref(rounded, scalars, grad_in.cpu(), torch.float32)
        baseline = (baseline[0].to(dtype), baseline[1], baseline[2].to(dtype))
    else:
        expected, baseline = _ref(rounded, scalars, grad_in.cpu()), (None,) * 3
    assert [g.dtype for g in got] == [dtype, F64 if dtype == F64 else torch.float32, dtype]
    for name, g, e, b in zip(("out", "stats", "grad_kernel"), got, expected, baseline):
        _assert_close(g, e, dtype, b, name)


def _strided(x):
    """A non-contiguous tensor with ``x``'s values: a transposed copy for 3-d, every other column otherwise."""
    if x.dim() == 3:
        return x.transpose(1, 2).contiguous().transpose(1, 2)
    wide = torch.zeros(x.shape[0], 2 * x.shape[1], dtype=x.dtype, device=x.device)
    wide[:, ::2] = x
    return wide[:, ::2]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", (0, 1, 2))
def test_non_contiguous_inputs(variant, device):
    tensors, scalars, grad = _case(3, "5x3", variant)
    inputs = {k: _strided(v) for k, v in _cast(tensors, F64, device).items()}
    assert not any(v.is_contiguous() for k, v in inputs.items())
    out, stats, grad_kernel = _op(inputs, scalars, _strided(grad.to(device)))
    assert out.is_contiguous() and grad_kernel.is_contiguous()
    for g, e in zip((out, stats, grad_kernel), _ref(tensors, scalars, grad)):
        torch.testing.assert_close(g.cpu(), e, rtol=1e-10, atol=1e-12)
    direct = torch.ops.srnc_ext.reweight_backward(_strided(grad.to(device)), **inputs, stats=_strided(stats), **scalars)
    torch.testing.assert_close(direct, grad_kernel, rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_normalize_segments(dtype, device):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 37, dtype=F64, generator=gen) * torch.tensor([[1.0], [3.0], [0.0], [1e-3], [1e-9]], dtype=F64)
    fallback = torch.randn(5, 37, dtype=F64, generator=gen)
    eps = 1e-6  # row 4 (norm ~ 6e-9) and the zero row 2 take the fallback
    got = torch.ops.srnc_ext.normalize_segments(_strided(x.to(device, dtype)), fallback.to(device, dtype), eps)
    assert got.dtype == dtype and got.shape == x.shape
    if dtype in LOW:
        rounded = (x.to(dtype).float(), fallback.to(dtype).float())
        baseline = naive.normalize_segments(*rounded, eps).to(dtype)
        _assert_close(got, naive.normalize_segments(x, fallback, eps), dtype, baseline, "normalize_segments")
    else:
        expected = naive.normalize_segments(x.to(dtype).to(F64), fallback.to(dtype).to(F64), eps)
        _assert_close(got, expected, dtype, what="normalize_segments")
    torch.testing.assert_close(got[[2, 4]].cpu(), fallback[[2, 4]].to(dtype), rtol=0, atol=0)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("P,L,M", [(1, 3, 37), (33, 5, 7), (300, 2, 3), (2, 4, 1000)], ids=str)
def test_normalize_segments_rows_layout(P, L, M, dtype, device):
    """(P, L, M): segment l is x[:, l, :] (a channels-last stack); agrees with the explicit per-segment norm."""
    gen = torch.Generator().manual_seed(P * L)
    x = torch.randn(P, L, M, dtype=F64, generator=gen) * torch.linspace(0.5, 3.0, L, dtype=F64)[:, None]
    x[:, L // 2] = 0.0  # falls back
    fallback = torch.randn(P, L, M, dtype=F64, generator=gen)
    got = torch.ops.srnc_ext.normalize_segments(_strided(x.to(device, dtype)), fallback.to(device, dtype), EPS)
    assert got.dtype == dtype and got.shape == x.shape
    segments = x.transpose(0, 1).reshape(L, -1)
    explicit = (segments / segments.norm(dim=1, keepdim=True)).reshape(L, P, M).transpose(0, 1)
    explicit[:, L // 2] = fallback[:, L // 2]
    if dtype in LOW:
        baseline = naive.normalize_segments(x.to(dtype).float(), fallback.to(dtype).float(), EPS).to(dtype)
        _assert_close(got, explicit, dtype, baseline, "normalize_segments")
    else:
        expected = naive.normalize_segments(x.to(dtype).to(F64), fallback.to(dtype).to(F64), EPS)
        torch.testing.assert_close(expected, explicit.to(dtype).to(F64), rtol=1e-6 if dtype == torch.float32 else 1e-12,
                                   atol=1e-7 if dtype == torch.float32 else 1e-14)
        _assert_close(got, expected, dtype, what="normalize_segments")
    torch.testing.assert_close(got[:, L // 2].cpu(), fallback[:, L // 2].to(dtype), rtol=0, atol=0)


def test_opcheck():
    tensors, scalars, grad = _case(3, "3x3", 2)
    kernel = tensors["kernel"].clone().requires_grad_()
    forward_args = (kernel, *list(tensors.values())[1:], *scalars.values())
    torch.library.opcheck(torch.ops.srnc_ext.reweight_forward.default, forward_args)
    _, stats = torch.ops.srnc_ext.reweight_forward(*forward_args)
    backward_args = (grad, *tensors.values(), stats.detach(), *scalars.values())
    torch.library.opcheck(torch.ops.srnc_ext.reweight_backward.default, backward_args)
    for x in (torch.randn(4, 9, dtype=F64), torch.randn(5, 3, 4, dtype=F64)):
        torch.library.opcheck(torch.ops.srnc_ext.normalize_segments.default, (x, torch.randn_like(x), 1e-12))


def test_stats_not_differentiable_and_constants_get_no_gradient():
    tensors, scalars, grad = _case(3, "3x3", 1)
    t = {k: v.clone().requires_grad_() for k, v in tensors.items()}
    out, stats = compiled.reweight_forward(**t, **scalars)
    assert out.requires_grad and not stats.requires_grad
    grads = torch.autograd.grad(out, list(t.values()), grad, allow_unused=True)
    assert grads[0] is not None and all(g is None or not g.any() for g in grads[1:])


def _bad(**changes):
    tensors, scalars, _ = _case(3, "3x3", 2)
    args = {**tensors, **scalars}
    for name, change in changes.items():
        args[name] = change(args[name])
    return args


BAD = {
    "kernel dims": (dict(kernel=lambda k: k[0]), "kernel must be (L, M, T)"),
    "s1 shape": (dict(s1=lambda x: x[:, :-1]), "s1 must have kernel's shape"),
    "direction dtype": (dict(direction=lambda x: x.float()), "direction must have kernel's dtype"),
    "s1_out shape": (dict(s1_out=lambda x: x[:2]), "s1_out must have kernel's shape"),
    "kernel dtype": (dict(kernel=lambda x: x.long(), s1=lambda x: x.long(), direction=lambda x: x.long(),
                          s1_out=lambda x: x.long()), "kernel must be float16, bfloat16, float32 or float64"),
    "gram shape": (dict(gram=lambda g: g[:-1]), "gram must be (T, T)"),
    "consts shape": (dict(consts=lambda c: c[:, :1]), "consts must be (L, 2)"),
    "consts layers": (dict(consts=lambda c: c[:2]), "consts must be (L, 2)"),
    "variant": (dict(variant=lambda v: 3), "variant must be 0"),
    "device": (dict(s1=lambda x: x.to("meta")), "s1 must be on kernel's device"),
}


@pytest.mark.parametrize("case", BAD.values(), ids=BAD.keys())
def test_bad_inputs_name_the_argument(case):
    changes, message = case
    with pytest.raises(RuntimeError, match=re.escape(message)):
        torch.ops.srnc_ext.reweight_forward(**_bad(**changes))


def test_bad_backward_and_normalize_inputs():
    tensors, scalars, grad = _case(3, "3x3", 2)
    stats = torch.zeros(3, 3, dtype=F64)
    with pytest.raises(RuntimeError, match="stats must be \\(L, 3\\)"):
        torch.ops.srnc_ext.reweight_backward(grad, **tensors, stats=stats[:, :2], **scalars)
    with pytest.raises(RuntimeError, match="grad must have kernel's shape"):
        torch.ops.srnc_ext.reweight_backward(grad[:, 1:], **tensors, stats=stats, **scalars)
    x = torch.randn(4, 9, dtype=F64)
    with pytest.raises(RuntimeError, match="x must be \\(L, N\\) or \\(P, L, M\\)"):
        torch.ops.srnc_ext.normalize_segments(x[0], x[0], 1e-12)
    with pytest.raises(RuntimeError, match="x must be \\(L, N\\) or \\(P, L, M\\)"):
        torch.ops.srnc_ext.normalize_segments(x[None, None], x[None, None], 1e-12)
    with pytest.raises(RuntimeError, match="fallback must have x's dtype"):
        torch.ops.srnc_ext.normalize_segments(x, x.float(), 1e-12)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU")
def test_cuda_op_rejects_mixed_devices():
    args = _bad(kernel=lambda k: k.cuda(), direction=lambda x: x.cuda(), s1_out=lambda x: x.cuda(),
                gram=lambda g: g.cuda(), consts=lambda c: c.cuda())
    with pytest.raises(RuntimeError, match="s1 must be on kernel's device"):
        torch.ops.srnc_ext.reweight_forward(**args)


def _cuda_buildable():
    """Mirror of setup.py: a CUDA torch, a toolkit with bin/nvcc of the same major version, not disabled."""
    if torch.version.cuda is None or os.environ.get("SRNC_BUILD_CUDA") == "0":
        return False
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        nvcc = os.path.join(root or "", "bin", "nvcc")
        if root and os.path.isfile(nvcc):
            release = re.search(r"release (\d+)\.", subprocess.check_output([nvcc, "--version"], text=True))
            return release is None or release.group(1) == torch.version.cuda.split(".")[0]
    return False


def test_cuda_kernels_registered_when_buildable():
    if not _cuda_buildable():
        pytest.skip("no CUDA build of torch with a matching toolkit, or SRNC_BUILD_CUDA=0: CPU-only build expected")
    assert compiled.has_cuda_kernels(), "setup.py could build the CUDA ops but the extension has none: rebuild"
