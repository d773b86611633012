"""Builds and loads the one native kernel: `bf16_linear.cc`, the bfloat16
matrix-vector product of decoding on JAX's CPU backend and on torch's, for
x86-64 CPUs with AVX2 (see the file, and `gemma_keras.backend.linear`).

It is compiled on first use with the system's C++ compiler (`$CXX`, else
`c++` or `g++`), for JAX against the XLA FFI headers that jaxlib ships, into
the cache (`$GEMMA_KERAS_CACHE/kernels`): one library per source, flags,
headers and compiler, written under a temporary name and renamed into place,
so an interrupted build leaves nothing half-written. Where it cannot be
built or run (no compiler, another CPU) `load` returns None after one
warning, and bfloat16 takes the backend's own product: the same numbers up
to the order of the float32 sums, slower. `GEMMA_KERAS_NATIVE=0` turns the
kernel off.
"""

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from pathlib import Path

from gemma_keras import resolve

SOURCE = Path(__file__).with_name("bf16_linear.cc")
DISABLE_ENV = "GEMMA_KERAS_NATIVE"
FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w"]

logger = logging.getLogger(__name__)


def enabled():
    """False where `GEMMA_KERAS_NATIVE=0`: every product takes the backend's own route."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


@functools.cache
def load(include_dir=None):
    """The kernel library (ctypes), or None where it cannot be built or run here.

    It exports `gemma_bf16_linear`, a C function (see `bf16_linear.cc`), and,
    given `include_dir` (where XLA's FFI headers are: `jax.ffi.include_dir()`),
    the XLA FFI handler `gemma_bf16_linear_ffi`.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return _unavailable(f"the kernel is written for x86-64, not {platform.machine()}")
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        return _unavailable("no C++ compiler found (set CXX, or install g++)")
    try:
        library = ctypes.CDLL(str(_build(compiler, include_dir and Path(include_dir))))
    except (OSError, subprocess.CalledProcessError) as error:
        details = getattr(error, "stderr", "") or ""
        return _unavailable(f"building {SOURCE.name} failed: {error}\n{details[-2000:]}")
    if not library.gemma_bf16_linear_supported():
        return _unavailable("this CPU lacks AVX2 or FMA")
    library.gemma_bf16_linear.restype = None
    library.gemma_bf16_linear.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int64] * 4
    return library


def _build(compiler, include_dir):
    """Compiles the source into the cache once; returns the library's path."""
    command = [compiler, *FLAGS]
    headers = []
    if include_dir is not None:
        command += ["-DGEMMA_KERAS_XLA_FFI", f"-I{include_dir}"]
        headers = sorted((include_dir / "xla" / "ffi" / "api").glob("*.h"))
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    inputs = [SOURCE.read_bytes(), repr(command).encode(), version.encode()]
    key = hashlib.sha256(b"".join(inputs + [h.read_bytes() for h in headers])).hexdigest()[:16]
    directory = resolve.cache_dir() / "kernels"
    target = directory / f"bf16_linear-{key}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [*command, str(SOURCE), "-o", str(built)], check=True, capture_output=True, text=True
        )
        os.replace(built, target)
    return target


def _unavailable(reason):
    logger.warning(
        "gemma_keras: bfloat16 decoding takes the backend's own, slower product: %s",
        reason,
    )
    return None
