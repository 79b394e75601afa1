"""What ``pip install`` makes of the project: the wheel's metadata and files,
and an editable install that does not print setuptools' notices.

Each test builds from a copy of the files a build reads (so the shared
checkout gets no ``build/`` or ``*.egg-info``) with pip and setuptools as a
user's pip gets them (an isolated build environment).
"""

from __future__ import annotations

import email.parser
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_INPUTS = ("pyproject.toml", "README.md", "LICENSE", "pyrepl3_kernel", "jupyter-config")


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A copy of what the build reads."""
    src = tmp_path / "src"
    src.mkdir()
    for name in BUILD_INPUTS:
        path = REPO / name
        if path.is_dir():
            shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(path, src / name)
    return src


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_wheel_has_license_authors_and_only_the_dependencies_it_uses(
    source: Path, tmp_path: Path
) -> None:
    done = pip("wheel", "--no-deps", "--wheel-dir", str(tmp_path / "dist"), str(source))
    assert done.returncode == 0, done.stderr
    (wheel,) = (tmp_path / "dist").glob("pyrepl3_kernel-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = zf.namelist()
        (license_file,) = [n for n in names if n.endswith(".dist-info/licenses/LICENSE")]
        assert zf.read(license_file).decode() == (REPO / "LICENSE").read_text()
        (metadata_file,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(zf.read(metadata_file).decode())
    assert not [n for n in names if n.split("/")[0] in ("tests", "benchmarks", "examples")]

    license_text = (REPO / "LICENSE").read_text()
    assert license_text.startswith("MIT License\n")
    assert "pyrepl3-kernel developers" in license_text
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Author"] == "pyrepl3-kernel developers"

    requires = metadata.get_all("Requires-Dist")
    always = {r.split(";")[0] for r in requires if "extra ==" not in r}
    server = {r.split(";")[0] for r in requires if 'extra == "server"' in r}
    always_names = {r.split("<")[0].split(">")[0].split("=")[0].lower() for r in always}
    # dill: nothing in the package imports it (the checkpoint benchmark does).
    assert "dill" not in always_names
    # jupyter_server only for `pyrepl3-kernel gateway`: an extra.
    assert "jupyter_server" not in always_names
    assert any(r.startswith("jupyter_server") for r in server)
    # Without ipykernel, jupyter_client warns "Native kernel (python3) is not
    # available" at every kernel spec lookup.
    assert "ipykernel" in always_names


def test_dill_is_not_imported_by_the_package() -> None:
    hits = [
        str(path.relative_to(REPO))
        for path in (REPO / "pyrepl3_kernel").rglob("*.py")
        if any(
            line.strip().startswith(("import dill", "from dill"))
            for line in path.read_text(encoding="utf-8").splitlines()
        )
    ]
    assert hits == []


def test_editable_install_prints_no_setuptools_notice(source: Path, tmp_path: Path) -> None:
    target = tmp_path / "venv"
    venv.create(target, with_pip=False)
    python = target / "bin" / "python"
    done = pip("--python", str(python), "install", "--no-deps", "--editable", str(source))
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "BuildBackendWarning" not in output, output
    assert "Editable installation" not in output, output
    # and the install works: the package is imported from the checkout
    where = subprocess.run(
        [str(python), "-c", "import pyrepl3_kernel._version as v; print(v.__file__)"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()).is_relative_to(source)
