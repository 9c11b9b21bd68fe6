"""The built wheel ships the ``py.typed`` markers (PEP 561), so a user's type checker
reads streamd's annotations instead of treating the packages as untyped. (Here beside
the image's wheel build rather than in tests/unit: pip builds a wheel, seconds.)"""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile

from tests.conftest import ROOT

TYPED_PACKAGES = ("streamd", "segments", "consumer_groups")


def test_wheel_ships_a_py_typed_marker_for_every_package(tmp_path):
    # Built from a copy: an in-tree build would leave build/ and egg-info behind.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in TYPED_PACKAGES:
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir",
         str(tmp_path / "wheels"), str(src)],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("streamd-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for package in TYPED_PACKAGES:
        assert (ROOT / package / "py.typed").is_file(), package
        assert f"{package}/py.typed" in names, package
