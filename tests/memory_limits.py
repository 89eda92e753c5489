"""A bound on what a test may allocate: the crafted-tensor tests check that nothing tries to
allocate what a tensor's shape claims (a lazy allocation would not show in the RSS)."""
import contextlib
import os
import resource

import pytest


@contextlib.contextmanager
def address_space_headroom(extra=1 << 30):
    """Inside, the process may map at most ``extra`` more bytes (RLIMIT_AS): an attempt to allocate
    what a crafted tensor claims fails there instead of succeeding lazily."""
    if not os.path.exists("/proc/self/status"):
        pytest.skip("needs Linux's /proc to bound the address space")
    with open("/proc/self/status") as f:
        vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = vm + extra if hard == resource.RLIM_INFINITY else min(vm + extra, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
