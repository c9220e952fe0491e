"""Kernel sources and compilation: read the .cu files from the package, compile each instantiation once.

Kept apart from the launchers so the source handling and the error message are testable without CuPy.
"""
from __future__ import annotations

import functools
import importlib.resources
import re

from ..errors import OffloadError

COMPILE_OPTIONS = ("-std=c++17", "--use_fast_math")


_INCLUDE = re.compile(r'^#include "([\w.]+\.cuh)"$', re.MULTILINE)


@functools.cache
def source(file: str) -> str:
    """A kernel file with its `#include "x.cuh"` lines replaced by those files (NVRTC is given no include
    path); an included file may include others."""
    here = importlib.resources.files(__package__)
    return _INCLUDE.sub(lambda m: source(m.group(1)), here.joinpath(file).read_text())


def compile_error(kernel: str, log: str) -> OffloadError:
    """One-line error naming the kernel and the first compiler error line."""
    lines = [ln.strip() for ln in str(log).splitlines() if ln.strip()]
    first = next((ln for ln in lines if "error" in ln.lower()), lines[0] if lines else "no compiler log")
    return OffloadError(f"CUDA kernel {kernel} failed to compile: {first}; "
                        "fix the .cu source or use a CuPy/NVRTC that matches the installed CUDA driver")


_functions: dict[tuple[str, str, int, tuple[str, ...]], object] = {}


def function(file: str, name: str, device_index: int, defines: tuple[str, ...] = ()):
    """The compiled kernel `name` (a name expression such as attend_kernel<BF16, BF16, 128, 4, int>).

    `defines` are extra -D options (tuning knobs of a .cu file); each set compiles separately.
    """
    key = (file, name, device_index, defines)
    fn = _functions.get(key)
    if fn is None:
        import cupy
        from cupy.cuda import compiler

        with cupy.cuda.Device(device_index):
            exprs = None if name.isidentifier() else [name]
            module = cupy.RawModule(code=source(file), options=COMPILE_OPTIONS + defines, name_expressions=exprs)
            try:
                fn = module.get_function(name)
            except compiler.CompileException as exc:
                raise compile_error(name, str(exc)) from exc
        _functions[key] = fn
    return fn
