"""Package build: the Python packages plus the SWIG-wrapped C++ bilateral filter.

`pip install .` / `pip install -e .` compile wrapper/bilateralfilter through setuptools' SWIG
support (swig and numpy come from pyproject's build requirements), with OpenMP at compile and
link time when the compiler has it. BILATERALFILTER_NO_OPENMP=1 forces a single-threaded build.
"""
import os
import tempfile

from setuptools import Extension, find_packages, setup
from setuptools.command.build import build
from setuptools.command.build_ext import build_ext

WRAPPER_DIR = "wrapper/bilateralfilter"
PACKAGES = find_packages(include=["network", "tool", "voc12", "coco14"])
OPENMP_TEST = "#include <omp.h>\nint probe(void) { return omp_get_max_threads(); }\n"


class BuildExtensionsFirst(build):
    """Runs build_ext before build_py: SWIG writes bilateralfilter.py during build_ext, and
    build_py would otherwise have run already and left it out of the wheel."""

    sub_commands = sorted(build.sub_commands, key=lambda command: command[0] != "build_ext")


class BuildExtensionWithOpenMP(build_ext):
    """Adds the compiler's OpenMP flags to both compile and link, if a probe builds with them."""

    def build_extensions(self) -> None:
        import numpy  # a build requirement (pyproject.toml), needed only once compiling

        flags = self._openmp_flags()
        if not flags:
            print("bilateralfilter: OpenMP not available, building single-threaded")
        # Python's own CFLAGS carry -fwrapv, which halves the lattice's speed (signed index
        # arithmetic may no longer be simplified); no trapping math lets more loops vectorise, and
        # no fused multiply-add keeps every float operation, so the released results, as they are.
        optimise = [] if self.compiler.compiler_type == "msvc" else [
            "-O3", "-std=c++14", "-fno-wrapv", "-fno-trapping-math", "-fno-math-errno", "-ffp-contract=off"]
        for extension in self.extensions:
            extension.include_dirs.append(numpy.get_include())
            extension.extra_compile_args += optimise + flags
            extension.extra_link_args += flags
        super().build_extensions()

    def _openmp_flags(self) -> list[str]:
        if os.environ.get("BILATERALFILTER_NO_OPENMP") == "1":
            return []
        flag = "/openmp" if self.compiler.compiler_type == "msvc" else "-fopenmp"
        with tempfile.TemporaryDirectory() as tmp:
            source = os.path.join(tmp, "openmp_probe.c")
            with open(source, "w") as handle:
                handle.write(OPENMP_TEST)
            try:
                objects = self.compiler.compile([source], output_dir=tmp, extra_postargs=[flag])
                self.compiler.link_shared_object(objects, os.path.join(tmp, "probe.so"), extra_postargs=[flag])
            except Exception:  # any compile/link failure means no usable OpenMP
                return []
        return [flag]


bilateral_extension = Extension(
    "_bilateralfilter",
    sources=[
        f"{WRAPPER_DIR}/bilateralfilter.i",
        f"{WRAPPER_DIR}/bilateralfilter.cpp",
        f"{WRAPPER_DIR}/permutohedral.cpp",
    ],
    depends=[f"{WRAPPER_DIR}/bilateralfilter.h", f"{WRAPPER_DIR}/permutohedral.h"],
    include_dirs=[WRAPPER_DIR],
    swig_opts=["-c++"],
    language="c++",
)

setup(
    name="rrm",
    version="0.1.0",
    description="RRM: end-to-end weakly supervised semantic segmentation (AAAI 2020), reference reimplementation",
    packages=PACKAGES,
    # The SWIG-generated top-level module `bilateralfilter` lives next to its sources.
    package_dir={"": WRAPPER_DIR, **{package: package.replace(".", "/") for package in PACKAGES}},
    py_modules=["bilateralfilter"],
    ext_modules=[bilateral_extension],
    cmdclass={"build": BuildExtensionsFirst, "build_ext": BuildExtensionWithOpenMP},
    # package_dir[""] would otherwise put rrm.egg-info inside the wrapper sources.
    options={"egg_info": {"egg_base": "."}},
    python_requires=">=3.10",
)
