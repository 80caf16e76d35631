"""Build of terdit-edge: the pure-Python packages plus the Cython/C kernel extension.

The C kernels are compiled for the baseline ISA; AVX2/FMA code carries per-function target
attributes and is chosen at run time, so one build runs on every x86-64 (and NEON on aarch64).
Set TERDIT_NATIVE=1 (opt-in) to add -march=native for a private build (never the default).
OpenMP is used when the compiler supports it.
"""
import os
import subprocess
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext


def _compiler_accepts(compiler_cmd, flags):
    """True if the C compiler builds a tiny OpenMP program with these flags."""
    src = "#include <omp.h>\nint main(void){return omp_get_max_threads() > 0 ? 0 : 1;}\n"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "t.c")
        with open(path, "w") as f:
            f.write(src)
        try:
            r = subprocess.run([*compiler_cmd, *flags, path, "-o", os.path.join(d, "t")],
                               capture_output=True, timeout=60)
        except (OSError, subprocess.SubprocessError):
            return False
        return r.returncode == 0


class BuildExt(build_ext):
    def build_extensions(self):
        cc = getattr(self.compiler, "compiler_so", None) or [os.environ.get("CC", "cc")]
        cc = [cc[0]]
        is_msvc = self.compiler.compiler_type == "msvc"
        omp = []
        if not is_msvc and os.environ.get("TERDIT_NO_OPENMP") != "1" and _compiler_accepts(cc, ["-fopenmp"]):
            omp = ["-fopenmp"]
        for ext in self.extensions:
            if is_msvc:
                ext.extra_compile_args = ["/O2", "/openmp"]
                continue
            # no contraction of a * b + c into an FMA: the kernels fuse exactly where they say so (fmaf,
            # SIMD fma intrinsics), so every compiler and target rounds the same operations (the same bits
            # on every CPU, docs/reproducibility.md)
            ext.extra_compile_args = ["-O3", "-std=c11", "-fno-strict-aliasing", "-ffp-contract=off", *omp]
            ext.extra_link_args = [*omp]
            if os.environ.get("TERDIT_NATIVE") == "1":  # opt-in only; shipped builds dispatch at run time
                ext.extra_compile_args.append("-march=native")  # opt-in (TERDIT_NATIVE=1) only
            ext.define_macros = [*(ext.define_macros or []), ("TERDIT_HAVE_OPENMP", "1" if omp else "0")]
        super().build_extensions()


def extensions():
    from Cython.Build import cythonize

    ext = Extension(
        "terdit_edge._ternary",
        sources=["src_cy/_ternary.pyx", "src_cy/ternary_gemm.c", "src_cy/ternary_avx2.c",
                 "src_cy/ternary_neon.c", "src_cy/ternary_lut.c", "src_cy/ternary_avx512.c"],
        include_dirs=["src_cy"],
    )
    return cythonize([ext], compiler_directives={"language_level": "3", "boundscheck": False,
                                                 "wraparound": False, "cdivision": True})


setup(
    packages=sorted(set(find_packages(include=["terdit_edge", "terdit_edge.*"])) | {"terdit_edge.converters"}),
    package_dir={"terdit_edge": "terdit_edge", "terdit_edge.converters": "converters"},
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExt},
)
