"""pip install . / pip install -e . : a thin shim that drives CMake (ninja) for detailflow_engine._C.

Environment: DETAILFLOW_CUDA=OFF skips the CUDA sources; CMAKE_ARGS adds CMake arguments;
CMAKE_BUILD_PARALLEL_LEVEL sets the build jobs. If the C++ build fails the package still
installs when DETAILFLOW_ALLOW_NO_EXT=1, and the ops fall back to torch (one warning).
"""
import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: CMakeExtension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_dir = Path(self.build_temp).resolve() / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        import pybind11

        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            "-DCMAKE_BUILD_TYPE=Release",
            "-GNinja",
        ]
        if os.environ.get("DETAILFLOW_CUDA", "").upper() in ("OFF", "0", "FALSE", "NO"):
            args.append("-DDETAILFLOW_CUDA=OFF")
        args += [a for a in os.environ.get("CMAKE_ARGS", "").split() if a]
        try:
            subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", "."], cwd=build_dir, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            if os.environ.get("DETAILFLOW_ALLOW_NO_EXT") == "1":
                print("detailflow: extension build failed; installing the torch fallback only", file=sys.stderr)
                return
            raise


setup(
    ext_modules=[CMakeExtension("detailflow_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
)
