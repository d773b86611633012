"""Builds and loads the native CPU kernels: `cpu_kernels.cc`, the
matrix-vector products of decoding on the CPU for every backend, for x86-64
CPUs with AVX2 and FMA (see the file, and `gemma_keras.backends.linear`):

- bfloat16 (and on torch float32) kernels: XLA FFI handler
  `gemma_bf16_linear_ffi`, TensorFlow operation `GemmaBf16Linear`, torch
  operator `gemma_keras::bf16_linear`;
- int8 and int4 kernels (`gemma_keras.quantization`'s forms, AVX512 where
  the CPU has it): XLA FFI handlers `gemma_int8_linear_ffi` and
  `gemma_int4_linear_ffi` (see `register_jax_quantized`), TensorFlow
  operations `GemmaInt8Linear` and `GemmaInt4Linear`, torch operators
  `gemma_keras::int8_linear` and `gemma_keras::int4_linear`, and
  `quantized_linear` on NumPy arrays (ctypes).

It is compiled on first use with the system's C++ compiler (`$CXX`, else
`c++` or `g++`), for JAX against the XLA FFI headers that jaxlib ships, for
TensorFlow against its headers and library as an op library, into
the cache (`$GEMMA_KERAS_CACHE/kernels`): one library per source, flags,
headers and compiler, written under a temporary name and renamed into place,
so an interrupted build leaves nothing half-written. Where it cannot be
built or run (no compiler, another CPU) `load` returns None after one
warning, and every product takes the backend's own: the same numbers up
to the order of the float32 sums, slower. `GEMMA_KERAS_NATIVE=0` turns the
kernels off.
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

import numpy as np

from gemma_keras import resolve

SOURCE = Path(__file__).with_name("cpu_kernels.cc")
QUANTIZED_FFI_TARGETS = {"int8": "gemma_int8_linear", "int4": "gemma_int4_linear"}
DISABLE_ENV = "GEMMA_KERAS_NATIVE"
FLAGS = ["-O3", "-mavx2", "-mfma", "-std=c++17", "-shared", "-fPIC", "-pthread", "-w"]

logger = logging.getLogger(__name__)


def enabled():
    """False where `GEMMA_KERAS_NATIVE=0`: every product takes the backend's own route."""
    return os.environ.get(DISABLE_ENV, "1") != "0"


@functools.cache
def load(include_dir=None):
    """The kernel library (ctypes), or None where it cannot be built or run here.

    It exports `gemma_bf16_linear_supported()`, whether this CPU runs the
    kernels (AVX2 and FMA, for every product), `gemma_quantized_linear` (see
    `quantized_linear`) and, given `include_dir` (where XLA's FFI headers are:
    `jax.ffi.include_dir()`), the XLA FFI handlers `gemma_bf16_linear_ffi`,
    `gemma_int8_linear_ffi` and `gemma_int4_linear_ffi`.
    """
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return _unavailable(f"the kernel is written for x86-64, not {platform.machine()}")
    compiler = _compiler()
    if not compiler:
        return _unavailable("no C++ compiler found (set CXX, or install g++)")
    flags, headers = [], []
    if include_dir is not None:
        flags = ["-DGEMMA_KERAS_XLA_FFI", f"-I{include_dir}"]
        headers = sorted((Path(include_dir) / "xla" / "ffi" / "api").glob("*.h"))
    try:
        library = ctypes.CDLL(str(_build(compiler, flags, key=[h.read_bytes() for h in headers])))
    except (OSError, subprocess.CalledProcessError) as error:
        return _build_failed(error)
    if not library.gemma_bf16_linear_supported():
        return _unavailable("this CPU lacks AVX2 or FMA")
    return library


@functools.cache
def has_bfloat16_dot():
    """Whether this CPU multiplies bfloat16 itself (AVX512-BF16), where the
    backends' own bfloat16 products beat the kernel from a few rows on; False
    where the kernel cannot run here."""
    library = load()
    return library is not None and bool(library.gemma_cpu_has_bfloat16_dot())


@functools.cache
def load_tensorflow():
    """The kernels as TensorFlow operations (the module that `tf.load_op_library`
    returns: `gemma_bf16_linear`, `gemma_int8_linear(x, kernels, scales)`,
    `gemma_int4_linear(x, kernels, scales, offsets)`, one output per kernel),
    or None where they cannot be built or run here.

    Built against the installed TensorFlow's headers and library, once per
    TensorFlow version (about 20 s).
    """
    import tensorflow as tf

    flags = ["-DGEMMA_KERAS_TF_OP", *tf.sysconfig.get_compile_flags()]
    link_flags = tf.sysconfig.get_link_flags()
    errors = (tf.errors.NotFoundError,)
    return _build_for(flags, link_flags, tf.__version__, tf.load_op_library, errors)


@functools.cache
def load_torch():
    """The kernel as the torch operator `gemma_keras::bf16_linear` (the
    `torch.ops` handle), or None where it cannot be built or run here. Loading
    it registers `torch.ops.gemma_keras.int8_linear(x, weights, threads)` and
    `int4_linear(x, weights, threads)` too, `weights` listing each kernel's
    integers and scale (int4: and offset), one output per kernel. They run on
    up to `threads` of torch's intra-op threads.

    Built against the installed torch's headers and libraries, once per
    torch version (about 15 s).
    """
    import torch

    root = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    # OpenMP for `at::parallel_for`: the operators run on torch's own threads,
    # linked to the libgomp that torch ships (its lib/ comes first).
    flags = [
        "-DGEMMA_KERAS_TORCH_OP",
        "-fopenmp",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{root / 'include'}",
    ]
    libraries = root / "lib"
    link_flags = [f"-L{libraries}", f"-Wl,-rpath,{libraries}", "-lc10", "-ltorch", "-ltorch_cpu"]

    def load_operator(path):
        torch.ops.load_library(path)
        return torch.ops.gemma_keras.bf16_linear

    return _build_for(flags, link_flags, torch.__version__, load_operator, (RuntimeError,))


def register_jax_quantized():
    """Registers the int8 and int4 XLA FFI handlers as JAX CPU targets (once);
    False where the kernel cannot be built or run here or `enabled()` is False.

    Then `jax.ffi.ffi_call(QUANTIZED_FFI_TARGETS[mode], outs)` multiplies
    float32 x `[..., n_in]` by each kernel that follows it: int8 `(x, kernel,
    scale, ...)`, int4 `(x, kernel, scale, offset, ...)`, one
    `jax.ShapeDtypeStruct((..., n_out), jnp.float32)` in `outs` per kernel
    (or `outs` that struct alone for one kernel); the arrays are
    `gemma_keras.quantization`'s forms.
    """
    return enabled() and _register_jax_quantized()


@functools.cache
def _register_jax_quantized():
    import jax

    library = load(jax.ffi.include_dir())
    if library is None:
        return False
    for target in QUANTIZED_FFI_TARGETS.values():
        handler = getattr(library, f"{target}_ffi")
        jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(handler), platform="cpu")
    return True


QUANTIZED_LOOPS = {None: 0, "avx2": 1, "avx512": 2, "avx512-vnni": 3}


def quantized_linear(x, mode, kernel, scale, offset=None, threads=2, loop=None):
    """`x @ w.T` on NumPy arrays, for a weight `w` in `gemma_keras.quantization`'s
    `mode` form (`kernel`, `scale`, `offset`), through ctypes: float32
    `[rows, n_out]`, or None where the kernel cannot be built or run here.

    `loop` None takes the CPU's best loop (on AVX512-VNNI, where the CPU has
    it, with x quantized: for int4 to int8 in blocks of 32, for int8 to 16
    bits per row);
    "avx2" and "avx512" (float x) take those below it, and "avx512-vnni" the
    VNNI loop without the GFNI instruction int4's takes where the CPU has it
    (for tests).

    >>> import numpy as np
    >>> from gemma_keras import quantization
    >>> weight = quantization.quantize(np.ones((8, 64)), "int4", group_size=32)
    >>> out = quantized_linear(np.ones((1, 64)), "int4", weight.kernel, weight.scale, weight.offset)
    >>> out is None or np.allclose(out, 64)
    True
    """
    if mode not in QUANTIZED_FFI_TARGETS:
        raise ValueError(f"Unknown quantized mode {mode!r}; the kernels take 'int8' or 'int4'.")
    if loop not in QUANTIZED_LOOPS:
        raise ValueError(f"Unknown loop {loop!r}; take one of {list(QUANTIZED_LOOPS)}.")
    library = load() if enabled() else None
    if library is None:
        return None
    x = np.ascontiguousarray(x, np.float32)
    kernel = np.ascontiguousarray(kernel)
    scale = np.ascontiguousarray(scale, np.float32)
    offset = None if offset is None else np.ascontiguousarray(offset, np.float32)
    (rows, n_in), n_out = x.shape, kernel.shape[0]
    out = np.empty((rows, n_out), np.float32)
    pointer = ctypes.c_void_p
    status = library.gemma_quantized_linear(
        ctypes.c_int(8 if mode == "int8" else 4),
        pointer(kernel.ctypes.data),
        pointer(scale.ctypes.data),
        pointer(None if offset is None else offset.ctypes.data),
        pointer(x.ctypes.data),
        pointer(out.ctypes.data),
        *(ctypes.c_int64(n) for n in (rows, n_out, n_in, n_in // scale.shape[1], threads)),
        ctypes.c_int(QUANTIZED_LOOPS[loop]),
    )
    if status != 0:
        raise ValueError(
            f"{mode} kernel {kernel.shape} with scale {scale.shape} does not fit x {x.shape}: "
            "see gemma_keras.quantization for the forms"
        )
    return out


def quantized_instruction_set():
    """The instruction set of the int8 and int4 kernels here ("avx512-vnni",
    "avx512" or "avx2"), or None."""
    library = load()
    if library is None:
        return None
    library.gemma_quantized_linear_isa.restype = ctypes.c_char_p
    return library.gemma_quantized_linear_isa().decode()


def _build_for(flags, link_flags, version, load_library, errors):
    """The kernel built against a framework (`flags`, `link_flags`; one build
    per framework `version`) and loaded by `load_library(path)`, or None after
    one warning where building or loading fails (`errors`: the framework's
    own loading errors)."""
    if load() is None:  # another CPU, no compiler: already warned
        return None
    try:
        built = _build(_compiler(), flags, link_flags, key=[version.encode()])
        return load_library(str(built))
    except (OSError, subprocess.CalledProcessError, *errors) as error:
        return _build_failed(error)


def _compiler():
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def _build(compiler, flags=(), link_flags=(), key=()):
    """Compiles the source into the cache once; returns the library's path.

    `key`: bytes that the library depends on beyond the source, the command
    and the compiler (the headers it includes, the version it links to)."""
    command = [compiler, *FLAGS, *flags]
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True).stdout
    inputs = [SOURCE.read_bytes(), repr([command, link_flags]).encode(), version.encode(), *key]
    digest = hashlib.sha256(b"".join(inputs)).hexdigest()[:16]
    directory = resolve.cache_dir() / "kernels"
    target = directory / f"{SOURCE.stem}-{digest}.so"
    if target.exists():
        return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        built = Path(scratch) / target.name
        subprocess.run(
            [*command, str(SOURCE), *link_flags, "-o", str(built)],
            check=True,
            capture_output=True,
            text=True,
        )
        os.replace(built, target)
    return target


def _build_failed(error):
    details = getattr(error, "stderr", "") or ""
    return _unavailable(f"building {SOURCE.name} failed: {error}\n{details[-2000:]}")


def _unavailable(reason):
    logger.warning(
        "gemma_keras: the native CPU kernels are unavailable, so decoding takes the "
        "backend's own, slower products: %s",
        reason,
    )
    return None
