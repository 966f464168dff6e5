"""The wheel ships the profiles: an installed copy, run from another directory, finds them."""

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(ROOT)],
        check=True, capture_output=True, text=True)
    (whl,) = out.glob("sparsefl-*.whl")
    return whl


def test_wheel_contains_packages_and_profiles(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for pkg in ("hwmodel/__init__.py", "embedded/__init__.py", "fl_core/cli.py",
                "fl_core/data/__init__.py", "fl_core/commands/__init__.py", "fl_core/examples/quick.toml",
                "embedded/layers/__init__.py", "embedded/kernels/__init__.py"):
        assert pkg in names
    tomls = [n for n in names if n.startswith("profiles/") and n.endswith(".toml")]
    assert {"profiles/rpi4.toml", "profiles/generic-x86.toml"} <= set(tomls)
    assert not any(n.startswith("tests/") for n in names)


def test_installed_wheel_finds_profiles_from_another_directory(wheel, tmp_path):
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target",
                    str(site), str(wheel)], check=True, capture_output=True, text=True)
    code = ("import hwmodel, sys; p = hwmodel.load_profile('rpi4'); "
            "assert hwmodel.__file__.startswith(sys.argv[1]), hwmodel.__file__; "
            "print(p.name, len(hwmodel.list_profiles()))")
    run = subprocess.run([sys.executable, "-c", code, str(site)], cwd=tmp_path,
                         env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    name, count = run.stdout.split()
    assert name == "rpi4" and int(count) >= 9
