"""A pytest plugin (`-p helpers.avx2_build`): the cpu extension built for AVX2 without
AVX-512 (-march=x86-64-v3), under its own cache name, in place of the host's -march=native
build. Its kernels take the paths an AVX-512 host never builds (scalar half-precision
conversions, no half-precision streaming stores)."""

from dept_kernels.backends import _cpu

_native_options = _cpu.jit_options
_native_name = _cpu.extension_name


def _avx2_options(digest: str) -> dict:
    options = _native_options(digest)
    flags = [f for f in options["extra_cflags"] if f != "-march=native"]
    return {**options, "extra_cflags": [*flags, "-march=x86-64-v3"]}


_cpu.jit_options = _avx2_options
_cpu.extension_name = lambda digest: f"{_native_name(digest)}_avx2"
