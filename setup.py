"""Build arpo_fast: setuptools drives CMake for the native module ``arpo_fast._C``.

The op modules in the top-level ``kernels/`` folder are copied into the subpackage
``arpo_fast.kernels`` of a built wheel. That folder has no ``__init__.py``, so run from the
repository root it never shadows Hugging Face's top-level ``kernels`` package (see
``arpo_fast/kernels/__init__.py``, which finds the folder itself in an editable install).
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str, source_dir: Path):
        super().__init__(name, sources=[])
        self.source_dir = str(source_dir)


class CMakeBuild(build_ext):
    """Configure and build one CMake target, placing the module where setuptools expects it."""

    def build_extension(self, ext: CMakeExtension) -> None:
        import pybind11

        out_file = Path(self.get_ext_fullpath(ext.name)).resolve()
        build_type = os.environ.get("ARPO_BUILD_TYPE", "Release")
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        cmake_args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DARPO_MODULE_OUTPUT_DIR={out_file.parent}",
            f"-DARPO_MODULE_FILENAME={out_file.name}",
            f"-DARPO_VERSION={read_version()}",
            "-DARPO_BUILD_TESTS=OFF",
        ]
        try:
            import ninja  # noqa: F401

            cmake_args.append("-GNinja")
        except ImportError:
            pass
        subprocess.run(["cmake", "-S", ext.source_dir, "-B", str(build_dir), *cmake_args], check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--target", "_C", "-j", jobs], check=True)


class BuildPyWithKernels(build_py):
    """Copy ``kernels/*.py`` into ``arpo_fast/kernels/`` of the build (not in editable mode)."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        target = Path(self.build_lib) / "arpo_fast" / "kernels"
        target.mkdir(parents=True, exist_ok=True)
        for source in sorted((ROOT / "kernels").glob("*.py")):
            self.copy_file(str(source), str(target / source.name))


def read_version() -> str:
    """The package version, read without importing the package (the build has no torch)."""
    text = (ROOT / "arpo_fast" / "_version.py").read_text()
    match = re.search(r'__version__\s*=\s*"([^"]+)"', text)
    if match is None:
        raise RuntimeError("arpo_fast/_version.py has no __version__")
    return match.group(1)


setup(
    packages=find_packages(include=["arpo_fast", "arpo_fast.*"]),
    ext_modules=[CMakeExtension("arpo_fast._C", ROOT)],
    cmdclass={"build_ext": CMakeBuild, "build_py": BuildPyWithKernels},
    zip_safe=False,
)
