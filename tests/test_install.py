"""The two install paths of the compiled ops (setup.py, srnc_ext/_jit_build.py).

- ``pip install .`` under build isolation: setup.py cannot import torch, installs a pure-Python
  package carrying the C++/CUDA sources, and the ops compile at first use against the installed
  torch (the slow test: a fresh venv, CPU ops).
- The first-use loader's decisions: no compiler, ``SRNC_JIT=0`` or a bad ``SRNC_JIT`` give a clear
  reason, and the package still imports and runs the reference ops with one warning.

The ahead-of-time path (``pip install --no-build-isolation -e .``) is the one the rest of the suite
runs on (``test_ops_compiled.py`` and the op harness skip loudly without it).
"""
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from srnc_ext import _jit_build

ROOT = Path(__file__).resolve().parents[1]
# A package imported from a copy must not be shadowed by the development install's editable finder
# (setuptools maps srnc_ext.* to the checkout, where srnc_ext._C exists).
NO_EDITABLE = ("import sys\n"
               "sys.meta_path[:] = [f for f in sys.meta_path if not getattr(f, '__module__', '').startswith('__editable__')]\n")


def _env(tmp_path, **changes):
    env = {k: v for k, v in os.environ.items() if k not in ("SRNC_JIT", "CXX", "PYTHONPATH", "SRNC_BACKEND")}
    env.update(TORCH_EXTENSIONS_DIR=str(tmp_path / "torch_extensions"), SRNC_BUILD_CUDA="0", OMP_NUM_THREADS="1",
               MAX_JOBS="1", PYTHONNOUSERSITE="1")
    env.update(changes)
    return env


def _run(args, **kwargs):
    proc = subprocess.run(args, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{args} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


# ---------------------------------------------------------------------------------------------- loader decisions
@pytest.mark.parametrize("env, reason", [
    ({"CXX": "/nonexistent/c++"}, "no C++ compiler: '/nonexistent/c++'"),
    ({"SRNC_JIT": "0"}, "SRNC_JIT=0 forbids compiling"),
    ({"SRNC_JIT": "yes"}, "SRNC_JIT must be 0 (never compile) or 1 (compile at first use), got 'yes'"),
], ids=["no compiler", "SRNC_JIT=0", "bad SRNC_JIT"])
def test_first_use_build_refuses_with_the_reason(tmp_path, monkeypatch, env, reason):
    for key in ("SRNC_JIT", "CXX"):
        monkeypatch.delenv(key, raising=False)
    for key, value in {"TORCH_EXTENSIONS_DIR": str(tmp_path / "torch_extensions"), "SRNC_BUILD_CUDA": "0", **env}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(_jit_build.BuildUnavailable, match=re.escape(reason)):
        _jit_build.load(log=lambda message: pytest.fail(f"nothing may be compiled: {message}"))
    assert not (tmp_path / "torch_extensions").exists() or not any((tmp_path / "torch_extensions").rglob("*.so"))


def test_without_a_compiler_the_package_imports_and_runs_the_reference_with_one_warning(tmp_path):
    """A package without srnc_ext._C (what an isolated `pip install .` leaves) on a machine without
    a C++ compiler: import works, the layer trains on the reference ops, one warning says why."""
    shutil.copytree(ROOT / "srnc_ext", tmp_path / "srnc_ext", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    script = NO_EDITABLE + textwrap.dedent("""
        import json, warnings
        import torch
        import srnc_ext
        from srnc_ext import backends
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layer = srnc_ext.SRNCConv2d(3, 4, 3, padding=1, alpha=2.0, beta=0.5, input_size=8)
            for _ in range(2):
                layer(torch.randn(2, 3, 8, 8)).square().sum().backward()
        from srnc_ext.ops import compiled
        print(json.dumps(dict(file=srnc_ext.__file__, origin=compiled.ORIGIN, available=compiled.AVAILABLE,
                              backend=backends.resolve(None, torch.device("cpu")),
                              warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)],
                              finite=bool(layer.weight.grad.isfinite().all()))))
    """)
    proc = _run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path, CXX="/nonexistent/c++"))
    got = json.loads(proc.stdout.splitlines()[-1])
    assert Path(got["file"]).parent == tmp_path / "srnc_ext"
    assert (got["origin"], got["available"], got["backend"], got["finite"]) == ("first-use", False, "reference", True)
    assert len(got["warnings"]) == 1, got["warnings"]
    assert "no C++ compiler" in got["warnings"][0] and "pure-PyTorch reference" in got["warnings"][0]
    assert "compiling" not in proc.stderr


def test_an_out_of_date_ahead_of_time_library_is_not_loaded(tmp_path):
    """srnc_ext._C built from other sources than the installed ones (a `git pull` without a rebuild,
    here: an op schema edited) is recognized from the fingerprint compiled into it, before loading:
    loading it would abort the process (its kernels do not match the schemas). With SRNC_JIT=0 the
    package imports and runs the reference ops, with one warning naming the stale library."""
    built = sorted((ROOT / "srnc_ext").glob("_C*.so"))
    if not built:
        pytest.skip("no ahead-of-time srnc_ext._C in this checkout")
    assert _jit_build.library_fingerprint(str(built[0])) == _jit_build.source_fingerprint()  # the dev build is current
    shutil.copytree(ROOT / "srnc_ext", tmp_path / "srnc_ext", ignore=shutil.ignore_patterns("__pycache__"))
    contract = tmp_path / "srnc_ext" / "ops" / "contract.py"
    text = contract.read_text()
    assert "float eps, int variant" in text
    contract.write_text(text.replace("float eps, int variant", "float eps, float extra, int variant", 1))
    script = NO_EDITABLE + textwrap.dedent("""
        import json, warnings
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import srnc_ext
            from srnc_ext.ops import compiled
            layer = srnc_ext.SRNCConv2d(3, 4, 3, padding=1, input_size=8)
            layer(torch.randn(1, 3, 8, 8)).sum().backward()
        print(json.dumps(dict(file=srnc_ext.__file__, available=compiled.AVAILABLE, error=type(compiled.IMPORT_ERROR).__name__,
                              backend=layer.ops.name,
                              warnings=[str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)])))
    """)
    proc = _run([sys.executable, "-c", script], cwd=tmp_path, env=_env(tmp_path, SRNC_JIT="0"))
    got = json.loads(proc.stdout.splitlines()[-1])
    assert Path(got["file"]).parent == tmp_path / "srnc_ext"
    assert (got["available"], got["error"], got["backend"]) == (False, "StaleLibrary", "reference")
    assert len(got["warnings"]) == 1 and "out-of-date build" in got["warnings"][0], got["warnings"]


# ---------------------------------------------------------------------------------------------- isolated install
def _copy_checkout(dest: Path) -> None:
    """The files git would ship (tracked and untracked-but-not-ignored): no .venv, no built _C."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                                capture_output=True, check=True).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        shutil.copytree(ROOT, dest, ignore=shutil.ignore_patterns(".git", ".venv", "build", "runs", "*.so", "*.egg-info",
                                                                  "__pycache__"))
        return
    for name in filter(None, listed):
        if (ROOT / name).is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)


@pytest.mark.slow
def test_isolated_pip_install_compiles_the_cpu_ops_at_first_use(tmp_path):
    """`pip install --no-deps .` (build isolation: the build has no torch) into a fresh venv that sees
    this torch, then the first import compiles the CPU ops, which equal the reference; a second
    process loads them from the cache. Measured on the 2-core CPU (other jobs running): 52 s in all,
    of which 7 s the venv, 8 s pip, 16-22 s the compile and 0.1 s the cached load."""
    src, venv = tmp_path / "src", tmp_path / "venv"
    _copy_checkout(src)
    _run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)])
    python = venv / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # torch (and numpy, scipy, ninja) from this environment, after the venv's own packages: nothing
    # downloaded. A path line in a .pth does not run that folder's .pth files (the editable finder).
    (site / "_srnc_test_torch.pth").write_text(str(Path(torch.__file__).resolve().parents[1]) + "\n")
    env = _env(tmp_path)
    # pip sees this environment's srnc_ext too and says "Not uninstalling srnc-ext at ..., outside
    # environment": it never removes a distribution outside the venv it installs into (checked below).
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-input", str(src)], env=env, cwd=tmp_path)
    assert importlib.metadata.distribution("srnc_ext").version, "the development install is still there"

    installed = site / "srnc_ext"
    assert not list(installed.glob("_C*")), "the isolated build cannot see torch: no compiled _C"
    assert {p.name for p in (installed / "csrc").iterdir()} >= {"srnc_ops.cpp", "srnc_ops_cuda.cu", "srnc_coefficients.h"}

    script = textwrap.dedent("""
        import json, sys, time
        start = time.perf_counter()
        import srnc_ext
        from srnc_ext.ops import compiled
        load_s = time.perf_counter() - start
        assert compiled.AVAILABLE, compiled.IMPORT_ERROR
        sys.path.insert(0, sys.argv[1])  # the op harness of the copied tests
        from op_harness import F64, assert_matches, op_case, oracle, run_op, scales
        case = op_case(3, "3x3", "projected")
        expected = oracle(case.tensors, case.scalars, case.grad)
        got = run_op(compiled.OPS, case.cast(F64), case.scalars, case.grad)
        for what, g, e, s in zip(("out", "stats", "grad_kernel"), got, expected,
                                 scales(expected, case.tensors["kernel"], case.grad)):
            assert_matches(g, e, F64, s, what)
        print(json.dumps(dict(file=srnc_ext.__file__, origin=compiled.ORIGIN, cuda=compiled.has_cuda_kernels(),
                              load_s=load_s)))
    """)
    runs = []
    for _ in range(2):
        start = time.perf_counter()
        proc = _run([str(python), "-c", script, str(src / "tests")], env=env, cwd=tmp_path)
        runs.append((json.loads(proc.stdout.splitlines()[-1]), proc.stderr, time.perf_counter() - start))
    (first, first_err, _), (second, second_err, _) = runs
    assert Path(first["file"]).parent == installed
    assert (first["origin"], first["cuda"]) == ("first-use", False)
    assert first_err.count(f"srnc_ext: compiling the C++ ops for torch {torch.__version__} (first use") == 1, first_err
    assert "compiling" not in second_err and second["origin"] == "first-use", second_err
    assert second["load_s"] < 5, "the second process loads the cached library"
