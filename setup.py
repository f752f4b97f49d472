"""Packaging: pure Python by default; the C++/CUDA libraries are JIT-built on first use.

The wheel carries csrc/ as fusedreg/_csrc so the JIT build works from an installed package.
FUSEDREG_BUILD_EXT=1 builds both libraries now, from that same copy, into fusedreg/_prebuilt/
<version key>/, which fusedreg uses whenever the running torch, CUDA and Python match. That path
imports torch at build time, so install with --no-build-isolation:

    FUSEDREG_BUILD_EXT=1 pip install --no-build-isolation .
"""
import os
import shutil
import sys
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithCsrc(build_py):
    def run(self):
        super().run()
        package = Path(self.build_lib) / "fusedreg"
        shutil.copytree(ROOT / "csrc", package / "_csrc", dirs_exist_ok=True)
        if os.environ.get("FUSEDREG_BUILD_EXT", "0") not in ("", "0"):
            self._build_ahead(package)

    def _build_ahead(self, package: Path) -> None:
        sys.path.insert(0, self.build_lib)  # the copy being installed, so the digests match it
        try:
            from fusedreg import _build
        finally:
            sys.path.pop(0)
        root = package / "_prebuilt"
        for kind, result in _build.build_ahead(root).items():
            print(f"fusedreg: {kind} library: {result}")
        # keep only what is loaded at run time: each library and its stamp
        for lock in root.glob("*/*.lock"):
            lock.unlink()
        for library_dir in root.glob("*/*"):
            for entry in library_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                elif entry.suffix not in (".so", ".stamp"):
                    entry.unlink()


setup(cmdclass={"build_py": BuildPyWithCsrc})
