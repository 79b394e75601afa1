"""The peer projects' sources: the sdist of the installed version of each,
downloaded once with ``pip download --no-deps --no-binary`` into a cache
directory that ignores itself in git, and unpacked there."""

from __future__ import annotations

import importlib.metadata
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from tests.peers.harness import PeerSetupError


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def prepare_cache(cache: Path) -> None:
    cache.mkdir(parents=True, exist_ok=True)
    ignore = cache / ".gitignore"
    if not ignore.exists():
        # The cache ignores itself, wherever it is.
        ignore.write_text("# downloaded by tests/peers/run_peers.py\n*\n")


def fetch_sources(dist: str, cache: Path) -> tuple[str, Path]:
    """The installed version of ``dist`` and its unpacked sdist (downloaded once)."""
    try:
        version = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise PeerSetupError(f"{dist} is not installed: install the dev extras") from None
    tree = cache / "src" / f"{_normalize(dist)}-{version}"
    if (tree / ".complete").exists():
        return version, tree
    sdists = cache / "sdists"
    sdists.mkdir(parents=True, exist_ok=True)
    archive = _find_sdist(sdists, dist, version)
    if archive is None:
        proc = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--quiet",
                "--no-deps",
                "--no-binary",
                dist,
                "--dest",
                str(sdists),
                f"{dist}=={version}",
            ],
            capture_output=True,
            text=True,
            timeout=600,
        )
        archive = _find_sdist(sdists, dist, version)
        if proc.returncode != 0 or archive is None:
            raise PeerSetupError(
                f"could not download the sdist of {dist}=={version} "
                f"(pip exit {proc.returncode}):\n{proc.stderr[-2000:]}"
            )
    tree.parent.mkdir(parents=True, exist_ok=True)
    unpack = Path(tempfile.mkdtemp(prefix=".unpack-", dir=tree.parent))
    try:
        with tarfile.open(archive) as tar:
            if hasattr(tarfile, "data_filter"):
                tar.extractall(unpack, filter="data")
            else:  # Python < 3.11.4
                tar.extractall(unpack)  # noqa: S202 (an sdist from PyPI we chose)
        (top,) = list(unpack.iterdir())
        (top / ".complete").write_text(str(archive.name))
        if tree.exists():
            shutil.rmtree(tree)
        top.rename(tree)
    finally:
        shutil.rmtree(unpack, ignore_errors=True)
    return version, tree


def _find_sdist(directory: Path, dist: str, version: str) -> Path | None:
    for path in directory.glob("*.tar.gz"):
        name, _, ver = path.name.removesuffix(".tar.gz").rpartition("-")
        if _normalize(name) == _normalize(dist) and ver == version:
            return path
    return None
