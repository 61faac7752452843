"""Packaging hooks that pyproject.toml cannot express.

- The C++ sources (`csrc`) are copied into the package as `dept_kernels/_csrc`, so an
  installed wheel can still build the cpu backend just in time on first use.
- With `DEPT_KERNELS_BUILD_EXT=1` the cpu extension is compiled ahead of time as
  `dept_kernels._cpu_ext`; a plain `pip install` (or `pip install -e .`) compiles nothing.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
CSRC = ROOT / "csrc"


def source_hash(sources: list[Path]) -> str:
    """Must match `dept_kernels._build.source_hash`: it marks a prebuilt module as current."""
    digest = hashlib.sha256()
    for path in sources:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


class BuildPyWithCsrc(build_py):
    def run(self) -> None:
        super().run()
        # An editable install finds the checkout's csrc directly; copying would litter it.
        if not self.editable_mode:
            shutil.copytree(
                CSRC, Path(self.build_lib) / "dept_kernels" / "_csrc", dirs_exist_ok=True
            )


cmdclass: dict = {"build_py": BuildPyWithCsrc}
ext_modules = []
if os.environ.get("DEPT_KERNELS_BUILD_EXT") == "1":
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    sources = sorted((CSRC / "cpu").glob("*.cpp"))
    headers = sorted((CSRC / "common").glob("*.h"))  # hashed as _build hashes them
    ext_modules.append(
        CppExtension(
            "dept_kernels._cpu_ext",
            [str(path.relative_to(ROOT)) for path in sources],
            # No -march=native: a prebuilt module must run on any CPU of its platform.
            extra_compile_args=[
                "-O3",
                "-fopenmp",
                f"-DDEPT_KERNELS_SOURCE_HASH={source_hash(sources + headers)}",
            ],
            extra_link_args=["-fopenmp"],
        )
    )
    cmdclass["build_ext"] = BuildExtension

setup(ext_modules=ext_modules, cmdclass=cmdclass)
