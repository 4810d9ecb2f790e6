"""pip install . / pip install -e . : a thin shim that drives CMake (ninja) for detailflow_engine._C.

Environment: DETAILFLOW_CUDA=OFF skips the CUDA sources; CMAKE_ARGS adds CMake arguments;
CMAKE_BUILD_PARALLEL_LEVEL sets the build jobs. If the C++ build fails the package still
installs when DETAILFLOW_ALLOW_NO_EXT=1, and the ops fall back to torch (one warning).

An editable install that finds its own extension already built in the source tree from the same
sources and options (csrc/, CMakeLists.txt, setup.py, DETAILFLOW_CUDA, CMAKE_ARGS, nvcc; recorded
in build/detailflow_ext_stamp.json with the library's hash) reuses it instead of compiling again:
the README's second command (`pip install -e ".[test]"`) then takes seconds, not another 2-3
minutes. DETAILFLOW_REBUILD=1 always compiles.
"""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


STAMP = ROOT / "build" / "detailflow_ext_stamp.json"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _build_inputs() -> dict:
    """Everything the extension's build depends on, as the stamp records it."""
    h = hashlib.sha256()
    for f in sorted([*(ROOT / "csrc").rglob("*"), ROOT / "CMakeLists.txt", ROOT / "setup.py"]):
        if f.is_file():
            h.update(f.relative_to(ROOT).as_posix().encode() + b"\0" + f.read_bytes() + b"\0")
    return {"sources": h.hexdigest(), "DETAILFLOW_CUDA": os.environ.get("DETAILFLOW_CUDA", ""),
            "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", ""), "nvcc": shutil.which("nvcc") or "",
            "python": sys.version}


class CMakeBuild(build_ext):
    def _reuse(self, ext: CMakeExtension, inputs: dict) -> bool:
        """Copy the in-tree library to the build output when the stamp says it is this build's."""
        if os.environ.get("DETAILFLOW_REBUILD") == "1":
            return False
        built = ROOT / "detailflow_engine" / Path(self.get_ext_filename(ext.name)).name
        try:
            stamp = json.loads(STAMP.read_text())
        except (OSError, ValueError):
            return False
        if not built.is_file() or stamp.get("inputs") != inputs or stamp.get("library_sha256") != _sha256(built):
            return False
        out = Path(self.get_ext_fullpath(ext.name)).resolve()
        out.parent.mkdir(parents=True, exist_ok=True)
        if out != built.resolve():
            shutil.copy2(built, out)
        print(f"detailflow: {built.name} is already built from these sources and options: reused "
              f"(DETAILFLOW_REBUILD=1 compiles it again)", file=sys.stderr)
        return True

    def build_extension(self, ext: CMakeExtension) -> None:
        inputs = _build_inputs()
        if self._reuse(ext, inputs):
            return
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
            STAMP.unlink()  # no stamp while a build is under way (or after one failed)
        except OSError:
            pass
        try:
            subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
            subprocess.run(["cmake", "--build", "."], cwd=build_dir, check=True)
        except (subprocess.CalledProcessError, FileNotFoundError):
            if os.environ.get("DETAILFLOW_ALLOW_NO_EXT") == "1":
                print("detailflow: extension build failed; installing the torch fallback only", file=sys.stderr)
                return
            raise
        library = Path(self.get_ext_fullpath(ext.name)).resolve()
        if library.is_file():
            try:
                STAMP.parent.mkdir(parents=True, exist_ok=True)
                STAMP.write_text(json.dumps({"inputs": inputs, "library_sha256": _sha256(library)}, indent=1))
            except OSError:
                pass  # a read-only source tree: the next install just compiles again


setup(
    ext_modules=[CMakeExtension("detailflow_engine._C")],
    cmdclass={"build_ext": CMakeBuild},
)
