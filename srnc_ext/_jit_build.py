"""How the compiled ops (``srnc_ext/csrc/``) are built: ahead of time by setup.py, or at first use.

One home for the build decisions, so that both paths build the same thing:

- the sources (``csrc/srnc_ops.cpp``, plus ``csrc/srnc_ops_cuda.cu`` for the CUDA kernels) and the
  compiler flags;
- whether the CUDA kernels are built (``cuda_build_home``): when a CUDA toolkit (``$CUDA_HOME``,
  ``$CUDA_PATH`` or ``/usr/local/cuda``, with ``bin/nvcc``) matches a CUDA build of torch.
  ``SRNC_BUILD_CUDA=1`` requires them, ``SRNC_BUILD_CUDA=0`` skips them;
- the environment of the build (``build_environment``): ninja on PATH, ``CUDA_HOME``, and
  ``TORCH_CUDA_ARCH_LIST=8.0;9.0`` when it is unset and no GPU is visible.

``setup.py`` loads this file by its path, without importing srnc_ext (which imports torch, absent
from an isolated build): nothing here imports torch at module level.

``load()`` is the first-use build, used by ``srnc_ext.ops.compiled`` when no ahead-of-time
``srnc_ext._C`` is installed (``pip install .`` with build isolation, where setup.py cannot see
torch): ``torch.utils.cpp_extension.load`` compiles the sources into a folder under torch's
extension cache (``$TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``), named by a
hash of everything the library depends on (sources, flags, torch and Python versions), so a
later process loads the library from there without a compiler. ``SRNC_JIT=0`` forbids compiling.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
from typing import Iterator, List, Optional, Tuple

CSRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc")
CPU_SOURCES = ("srnc_ops.cpp",)
CUDA_SOURCES = ("srnc_ops_cuda.cu",)
HEADERS = ("srnc_coefficients.h",)
NVCC_FLAGS = ["-O3"]
DEFAULT_CUDA_ARCHS = "8.0;9.0"  # with no GPU visible an unset TORCH_CUDA_ARCH_LIST crashes the build
JIT_NAME = "srnc_ext_C"  # the first-use library, loaded with torch.ops.load_library (not a Python module)


class BuildUnavailable(RuntimeError):
    """The ops cannot be compiled here; the message says why and what to do."""


def cuda_toolkit() -> Optional[str]:
    """The first of $CUDA_HOME, $CUDA_PATH, /usr/local/cuda holding bin/nvcc (`which nvcc` may be a wrapper)."""
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and os.path.isfile(os.path.join(root, "bin", "nvcc")):
            return root
    return None


def cuda_build_home(torch, log=print) -> Optional[str]:
    """The toolkit to build the CUDA ops with, or None for CPU ops only (``log`` says why).
    ``SRNC_BUILD_CUDA=1`` raises RuntimeError where they cannot be built; ``=0`` skips them."""
    mode = os.environ.get("SRNC_BUILD_CUDA", "")
    if mode == "0":
        return None
    home, why = cuda_toolkit(), None
    if torch.version.cuda is None:
        why = f"torch {torch.__version__} is not a CUDA build"
    elif home is None:
        why = "no CUDA toolkit with bin/nvcc in $CUDA_HOME, $CUDA_PATH or /usr/local/cuda"
    else:
        release = re.search(r"release (\d+)\.", subprocess.check_output([os.path.join(home, "bin", "nvcc"), "--version"],
                                                                        text=True))
        if release and release.group(1) != torch.version.cuda.split(".")[0]:
            why = f"the CUDA {release.group(1)} toolkit in {home} does not match torch's CUDA {torch.version.cuda}"
    if why is None:
        return home
    if mode == "1":
        raise RuntimeError(f"SRNC_BUILD_CUDA=1 but the CUDA ops cannot be built: {why}")
    log(f"srnc_ext: building the CPU ops only: {why}")
    return None


FINGERPRINT_MARKER = b"SRNC-SOURCES-SHA256:"  # compiled into the library, before the hex digest of its sources


def source_fingerprint(root: str = CSRC) -> str:
    """sha256 of what the compiled ops must match: the C++/CUDA sources and headers, and the op schemas
    (``ops/contract.py``'s ``SCHEMAS``, which the library's kernels register against)."""
    digest = hashlib.sha256()
    for name in sorted(CPU_SOURCES + CUDA_SOURCES + HEADERS):
        with open(os.path.join(root, name), "rb") as f:
            digest.update(name.encode() + b"\0" + f.read() + b"\0")
    with open(os.path.join(os.path.dirname(root), "ops", "contract.py"), "rb") as f:
        text = f.read()
    start = text.find(b"SCHEMAS = {")
    end = text.find(b"\n}\n", start)
    digest.update(text[start:end] if start >= 0 and end >= 0 else text)
    return digest.hexdigest()


def library_fingerprint(path: str) -> Optional[str]:
    """The source fingerprint compiled into the library at ``path`` (read from the file, without loading
    it: a library built from other sources can abort the process when loaded), None if it has none."""
    import mmap

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            at = data.find(FINGERPRINT_MARKER)
            if at < 0:
                return None
            start = at + len(FINGERPRINT_MARKER)
            value = data[start : start + 64].decode("ascii", "replace")
    except (OSError, ValueError):
        return None
    return value if re.fullmatch(r"[0-9a-f]{64}", value) else None


def sources(with_cuda: bool, root: str = CSRC) -> List[str]:
    return [os.path.join(root, name) for name in CPU_SOURCES + (CUDA_SOURCES if with_cuda else ())]


def compile_flags(torch, with_cuda: bool) -> Tuple[List[str], List[str]]:
    """(C++ flags, link flags). at::parallel_for only runs in parallel when the extension is compiled
    with the OpenMP that torch's ATen uses (its header's `#pragma omp parallel` is ignored otherwise):
    -fopenmp. No -std: cpp_extension picks the one the installed torch's headers need (C++20 for
    2.14, C++17 for 2.6); csrc/ is valid C++17."""
    openmp = ["-fopenmp"] if getattr(torch._C, "has_openmp", False) else []
    fingerprint = [f"-DSRNC_SOURCES_SHA256={source_fingerprint()}"]  # a bare token: no quoting through ninja
    return ["-O3"] + openmp + fingerprint + (["-DSRNC_WITH_CUDA"] if with_cuda else []), openmp


@contextlib.contextmanager
def build_environment(torch, cuda_home: Optional[str]) -> Iterator[None]:
    """ninja on PATH, CUDA_HOME and a default TORCH_CUDA_ARCH_LIST for the build; restored after."""
    saved = {k: os.environ.get(k) for k in ("PATH", "CUDA_HOME", "TORCH_CUDA_ARCH_LIST")}
    cpp_extension = sys.modules.get("torch.utils.cpp_extension")
    saved_home = getattr(cpp_extension, "CUDA_HOME", None)
    try:
        try:  # the `ninja` wheel puts its binary where PATH may not look (an unactivated venv's bin/)
            import ninja

            os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        except ImportError:
            pass
        if cuda_home:
            os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension when it is imported
            if cpp_extension is not None:  # ... or already was: its module-level CUDA_HOME is what it uses
                cpp_extension.CUDA_HOME = cuda_home
            if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
                os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCHS
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        if cuda_home and cpp_extension is not None:
            cpp_extension.CUDA_HOME = saved_home


# ---------------------------------------------------------------------------------------------- first use
def _cpp_extension():
    """torch.utils.cpp_extension, imported without its import-time "No CUDA runtime is found, using
    CUDA_HOME=..." warning: every CUDA torch on a machine without a GPU logs it, even for CPU ops."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        from torch.utils import cpp_extension
    finally:
        logger.setLevel(level)
    return cpp_extension


def _build_directory(torch, srcs: List[str], cxx: List[str], ldflags: List[str], cuda_home: Optional[str]) -> str:
    """A folder of torch's extension cache named by everything the library depends on."""
    key = hashlib.sha256()
    for path in srcs + [os.path.join(CSRC, name) for name in HEADERS]:
        with open(path, "rb") as f:
            key.update(os.path.basename(path).encode() + b"\0" + f.read() + b"\0")
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or (
        [torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())] if cuda_home else "")
    key.update(repr((cxx, ldflags, NVCC_FLAGS, cuda_home, archs, torch.__version__, torch.version.cuda,
                     sys.version_info[:2], sys.platform)).encode())
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or _cpp_extension().get_default_build_root()
    tag = f"py{sys.version_info[0]}{sys.version_info[1]}_torch{torch.__version__}_{'cuda' if cuda_home else 'cpu'}"
    return os.path.join(root, "srnc_ext", f"{re.sub(r'[^A-Za-z0-9._+-]', '_', tag)}_{key.hexdigest()[:12]}")


def _check_tools() -> None:
    """A clear BuildUnavailable where cpp_extension would fail for want of a compiler or ninja."""
    compiler = os.environ.get("CXX") or "c++"  # what torch.utils.cpp_extension compiles with
    words = shlex.split(compiler)
    if not words or shutil.which(words[0]) is None:
        raise BuildUnavailable(f"no C++ compiler: {compiler!r} (from $CXX, default c++) is not on PATH; "
                               "install one (e.g. `apt-get install g++`) or point $CXX at it")
    if not _cpp_extension().is_ninja_available():
        raise BuildUnavailable("ninja is not installed (`pip install ninja`); torch's cpp_extension needs it")


def _summary(exc: BaseException, build_dir: str) -> str:
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    errors = [line for line in lines[1:] if "error" in line.lower()][:3]
    log = f" (`ninja -v -C {build_dir}` shows the whole build)" if os.path.isfile(os.path.join(build_dir, "build.ninja")) else ""
    return "; ".join([lines[0][:120] if lines else type(exc).__name__] + errors) + log


def load(log=None) -> str:
    """Compile the ops for the installed torch (first use) or load them from the cache, registering
    their kernels; returns the library's path. Raises BuildUnavailable (why, and what to do)."""
    mode = os.environ.get("SRNC_JIT", "1")
    if mode == "0":
        raise BuildUnavailable("SRNC_JIT=0 forbids compiling them at first use")
    if mode != "1":
        raise BuildUnavailable(f"SRNC_JIT must be 0 (never compile) or 1 (compile at first use), got {mode!r}")
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    import torch

    try:
        home = cuda_build_home(torch, log=lambda message: None)  # CPU only is the normal case: not worth a line
    except RuntimeError as exc:  # SRNC_BUILD_CUDA=1 where it cannot be met
        raise BuildUnavailable(str(exc)) from exc
    srcs = sources(bool(home))
    cxx, ldflags = compile_flags(torch, bool(home))
    with build_environment(torch, home):
        build_dir = _build_directory(torch, srcs, cxx, ldflags, home)
        library = os.path.join(build_dir, JIT_NAME + ".so")
        if os.path.isfile(library):
            try:
                torch.ops.load_library(library)
                return library
            except OSError:  # damaged or half written (a build killed mid-link): build it again
                pass
        _check_tools()
        cpp_extension = _cpp_extension()

        kind = "C++/CUDA" if home else "C++"
        log(f"srnc_ext: compiling the {kind} ops for torch {torch.__version__} "
            f"(first use, about a minute; cached in {build_dir})...")
        try:
            os.makedirs(build_dir, exist_ok=True)
            cpp_extension.load(JIT_NAME, srcs, extra_cflags=cxx, extra_cuda_cflags=NVCC_FLAGS, extra_ldflags=ldflags,
                               build_directory=build_dir, with_cuda=bool(home), is_python_module=False, verbose=False)
        except (RuntimeError, OSError, subprocess.CalledProcessError) as exc:
            raise BuildUnavailable(f"compiling them failed: {_summary(exc, build_dir)}") from exc
    return library
