"""Every backend of the stacked ops enforces the same contract (``srnc_ext.ops.contract``): for
each op and each argument, one bad input raises the same error type, naming the argument."""
import pytest
import torch

from srnc_ext import backends
from srnc_ext.ops import contract

BACKENDS = {"reference": backends.REFERENCE}
if backends.compiled_available("cpu"):
    BACKENDS["compiled"] = backends.op_set("cpu", torch.device("cpu"))
if backends.triton_available("cpu"):
    BACKENDS["triton"] = backends.op_set("triton", torch.device("cpu"))


def _args():
    L, M, T = 2, 6, 9
    gen = torch.Generator().manual_seed(0)
    tensor = lambda *shape: torch.randn(*shape, dtype=torch.float64, generator=gen)  # noqa: E731
    return dict(grad=tensor(L, M, T), kernel=tensor(L, M, T), s1=tensor(L, M, T), direction=tensor(L, M, T),
                s1_out=tensor(L, M, T), gram=torch.eye(T, dtype=torch.float64), consts=tensor(L, 2).abs() + 1,
                stats=tensor(L, 3).abs() + 1, alpha=1.5, beta_rank=10.0, positions=25.0, eps=1e-12, variant=2,
                floor=0.0)


# (argument, bad value from the good arguments): one case per argument of the reweight ops
REWEIGHT_BAD = [
    ("grad", lambda a: a["grad"][:, :-1]),
    ("kernel", lambda a: a["kernel"][0]),
    ("s1", lambda a: a["s1"].float()),
    ("direction", lambda a: a["direction"][:1]),
    ("s1_out", lambda a: a["s1_out"].to("meta")),
    ("gram", lambda a: a["gram"][:-1]),
    ("consts", lambda a: a["consts"][:, :1]),
    ("stats", lambda a: a["stats"][:, :2]),
    ("alpha", lambda a: 0.0),
    ("positions", lambda a: -1.0),
    ("eps", lambda a: 0.0),
    ("variant", lambda a: 3),
    ("floor", lambda a: -1.0),
    ("floor", lambda a: float("nan")),
    ("floor", lambda a: float("inf")),
]
NORMALIZE_BAD = [
    ("x", lambda x, f: (x[0], f[0])),
    ("fallback", lambda x, f: (x, f[:, :-1])),
    ("eps", None),
]


def _call(ops, op, args):
    names = ["kernel", "s1", "direction", "s1_out", "gram", "consts"]
    if op == "reweight_backward":
        names = ["grad", *names, "stats"]
    scalars = [args[n] for n in ("alpha", "beta_rank", "positions", "eps", "variant", "floor")]
    return getattr(ops, op)(*[args[n] for n in names], *scalars)


def _error(fn):
    try:
        fn()
    except (ValueError, RuntimeError) as err:
        return type(err), str(err)
    return None, None


REWEIGHT_CASES = [pytest.param(op, name, bad, id=f"{op}-{name}-{i}")
                  for op in ("reweight_forward", "reweight_backward") for i, (name, bad) in enumerate(REWEIGHT_BAD)
                  if op == "reweight_backward" or name not in ("grad", "stats")]


@pytest.mark.parametrize("op,name,bad", REWEIGHT_CASES)
def test_reweight_ops_reject_each_argument_alike(op, name, bad):
    seen = {}
    for backend, ops in BACKENDS.items():
        args = _args()
        args[name] = bad(args)
        kind, message = _error(lambda: _call(ops, op, args))
        assert kind is not None, f"{backend}: {op} accepted a bad {name}"
        assert name in message and op in message, f"{backend}: {message}"
        seen[backend] = (kind, message)
    assert len({kind for kind, _ in seen.values()}) == 1, seen
    assert len({message for _, message in seen.values()}) == 1, seen  # one contract, one message


@pytest.mark.parametrize("name,bad", NORMALIZE_BAD, ids=[b[0] for b in NORMALIZE_BAD])
def test_normalize_segments_rejects_each_argument_alike(name, bad):
    seen = {}
    for backend, ops in BACKENDS.items():
        x = torch.randn(3, 8, dtype=torch.float64)
        args = (x, x.clone(), -1.0) if bad is None else (*bad(x, x.clone()), 1e-12)
        kind, message = _error(lambda: ops.normalize_segments(*args))
        assert kind is not None and name in message and "normalize_segments" in message, f"{backend}: {message}"
        seen[backend] = (kind, message)
    assert len(set(seen.values())) == 1, seen


def test_schemas_are_the_registered_ones():
    for namespace in ("srnc_ext", "srnc_ext_triton"):
        if not hasattr(torch.ops, namespace):
            continue
        for name, schema in contract.SCHEMAS.items():
            registered = str(getattr(getattr(torch.ops, namespace), name).default._schema)
            assert registered == f"{namespace}::{schema}", registered


def test_variant_codes_are_an_enum_matching_the_kernels():
    assert [int(v) for v in contract.Variant] == [0, 1, 2]
    from srnc_ext import ops

    assert (ops.VARIANT_SN, ops.VARIANT_PAPER, ops.VARIANT_PROJECTED) == tuple(contract.Variant)
