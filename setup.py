"""Build script. Metadata lives in pyproject.toml.

Packages: ``fimlora`` with its subpackages (found, so a new one needs no entry here) and
``fimlora._kernels``, whose sources live in ``kernels/``. The Triton kernels must never be
importable as a top-level ``kernels`` (a different PyPI package owns that name), hence the
package_dir mapping.

Optional compiled extension ``fimlora._C`` (sources in ``csrc/``): the ``fimlora::*`` torch
operators, with CPU kernels and, when CUDA is available to the build, CUDA kernels. It is
compiled against the torch found here, so install with ``--no-build-isolation`` (an isolated
build has no torch and installs pure Python). fimlora works without it: its ``compiled``
backend (``fimlora/backends/_compiled.py``) says at run time why it is missing. Environment
switches:

- ``FIMLORA_BUILD_EXT``: ``auto`` (default) tries, and on any failure warns and installs pure
  Python; ``1`` requires the extension (a failure fails the install, with the compiler's
  error); ``0`` skips it.
- ``FIMLORA_FORCE_CUDA=1``: build the CUDA kernels even where no GPU is visible (a CI or
  container build; needs a CUDA build of torch and nvcc). By default they are built when
  ``torch.cuda.is_available()``.
- ``TORCH_CUDA_ARCH_LIST``: GPU architectures, e.g. ``"8.0;9.0"`` (default: the visible GPUs').
- ``MAX_JOBS``: parallel compile jobs (read by torch's ninja build); ``NVCC_THREADS``: threads
  of one nvcc call across architectures (default 4).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from setuptools import find_packages, setup

BUILD_EXT = os.environ.get("FIMLORA_BUILD_EXT", "auto").strip().lower()
FORCE_CUDA = os.environ.get("FIMLORA_FORCE_CUDA", "0").strip() == "1"

CPU_SOURCES = ["csrc/ops.cpp", "csrc/module.cpp", "csrc/cpu/accumulate_cpu.cpp"]
CUDA_SOURCES = ["csrc/cuda/accumulate_cuda.cpp", "csrc/cuda/accumulate_kernel.cu"]
HEADERS = ["csrc/accumulate.h", "csrc/cuda/accumulate_kernel.h"]


def _warn(message: str) -> None:
    # pip shows a build's output only with -v or when it fails; the compiled backend repeats the
    # outcome at run time ("fimlora env"), so a silent fallback is still discoverable.
    print(f"WARNING (fimlora setup.py): {message}", file=sys.stderr)


class _Skip(Exception):
    """The extension cannot be built here: fatal with FIMLORA_BUILD_EXT=1, else a warning."""


def _extension_kwargs() -> dict:
    """``ext_modules`` and ``cmdclass`` for setup(), or {} for a pure-Python install."""
    if BUILD_EXT in ("0", "no", "false", "off"):
        return {}
    if BUILD_EXT not in ("auto", "1", "yes", "true", "on"):
        raise SystemExit(f"FIMLORA_BUILD_EXT must be auto, 1 or 0; got {BUILD_EXT!r}")
    required = BUILD_EXT != "auto"
    try:
        return _configure(required)
    except _Skip as reason:
        if required:
            raise SystemExit(f"FIMLORA_BUILD_EXT=1 but fimlora._C cannot be built: {reason}") from None
        _warn(f"fimlora._C is not built ({reason}); installing pure Python")
        return {}


def _configure(required: bool) -> dict:
    # torch is imported only here, so that setup.py still gives a pure-Python install without it.
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except Exception as exc:  # ImportError, or a broken torch install
        raise _Skip(f"torch cannot be imported ({exc}); install torch first and build with --no-build-isolation") from exc

    with_cuda = FORCE_CUDA or torch.cuda.is_available()
    if with_cuda:
        problem = None
        if torch.version.cuda is None:
            problem = f"torch {torch.__version__} has no CUDA support"
        elif CUDA_HOME is None:
            problem = "nvcc was not found (set CUDA_HOME)"
        if problem and FORCE_CUDA:
            raise _Skip(f"FIMLORA_FORCE_CUDA=1 but {problem}")
        if problem:  # a GPU is visible but its kernels cannot be compiled: the CPU kernels still help
            _warn(f"building fimlora._C without CUDA kernels: {problem}")
            with_cuda = False

    # Our code is C++17; -std is left to torch, whose own headers (2.13) use C++20 features.
    cxx_flags = ["-O3"]
    link_flags = []
    if sys.platform.startswith("linux") and torch.backends.openmp.is_available():
        # at::parallel_for is a header template: without -fopenmp here it silently runs serially.
        # libgomp is then torch's own (same soname, already loaded), so there is one thread pool.
        cxx_flags.append("-fopenmp")
        link_flags.append("-fopenmp")
    if with_cuda:
        nvcc_flags = ["-O3", "--threads", os.environ.get("NVCC_THREADS", "4")]
        extension = CUDAExtension(
            "fimlora._C",
            CPU_SOURCES + CUDA_SOURCES,
            depends=HEADERS,
            extra_compile_args={"cxx": cxx_flags, "nvcc": nvcc_flags},
            extra_link_args=link_flags,
        )
    else:
        extension = CppExtension(
            "fimlora._C", CPU_SOURCES, depends=HEADERS, extra_compile_args={"cxx": cxx_flags}, extra_link_args=link_flags
        )

    class BuildExt(BuildExtension):
        """torch's BuildExtension (ninja, MAX_JOBS), plus a generated build-info header and, unless
        FIMLORA_BUILD_EXT=1, a fallback to pure Python when compiling fails."""

        def build_extensions(self) -> None:
            self._write_build_info()
            super().build_extensions()

        def _write_build_info(self) -> None:
            # The exact torch this is compiled against, for the compiled backend to compare with the
            # running one. A header rather than a -D"..." flag: string defines need shell quoting
            # under ninja and none without it.
            folder = Path(self.build_temp).resolve() / "fimlora_generated"
            folder.mkdir(parents=True, exist_ok=True)
            header = folder / "fimlora_build_info.h"
            text = (
                "// Generated by setup.py; do not edit.\n"
                f"#define FIMLORA_BUILT_TORCH_VERSION {json.dumps(torch.__version__)}\n"
                f"#define FIMLORA_WITH_CUDA {int(with_cuda)}\n"
            )
            if not header.is_file() or header.read_text() != text:  # unchanged: no needless ninja rebuild
                header.write_text(text)
            for ext in self.extensions:
                if str(folder) not in ext.include_dirs:
                    ext.include_dirs.append(str(folder))

        def copy_extensions_to_source(self) -> None:
            # Editable installs copy the library into fimlora/. A running process (a test run
            # from the same venv) may have the old one mapped, and writing over it in place can
            # crash that process; unlinking first gives the new library a new inode instead.
            build_py = self.get_finalized_command("build_py")
            for ext in self.extensions:
                fullname = self.get_ext_fullname(ext.name)
                package = ".".join(fullname.split(".")[:-1])
                target = Path(build_py.get_package_dir(package)) / Path(self.get_ext_filename(fullname)).name
                target.unlink(missing_ok=True)
            super().copy_extensions_to_source()

        def run(self) -> None:
            try:
                super().run()
            except Exception as exc:  # compiler, linker, ninja or toolchain-check errors
                if required:
                    raise
                _warn(
                    f"building fimlora._C failed ({type(exc).__name__}: {exc}); installing pure Python. "
                    "Run with FIMLORA_BUILD_EXT=1 (and pip -v) to see the error."
                )
                # Nothing was built: report no outputs, so install/editable steps skip the extension.
                self.extensions = []

    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExt}}


setup(
    packages=[*find_packages(include=["fimlora", "fimlora.*"]), "fimlora._kernels"],
    package_dir={"fimlora._kernels": "kernels"},
    **_extension_kwargs(),
)
