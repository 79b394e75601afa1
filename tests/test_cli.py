"""Tests for the ``pyrepl3-kernel`` command line (install / uninstall / --version).

The CLI runs in a subprocess with HOME, JUPYTER_DATA_DIR, JUPYTER_PATH etc.
pointing into tmp_path, and every install uses --prefix or --user, so nothing
outside tmp_path is touched.
"""

from __future__ import annotations

import json
import os
import stat
import struct
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

try:
    import pyrepl3_kernel._version  # noqa: F401
except ImportError:  # not installed: use the checkout
    sys.path.insert(0, str(REPO))

from pyrepl3_kernel._version import __version__  # noqa: E402

LOGOS = ("logo-32x32.png", "logo-64x64.png", "logo-svg.svg")


@pytest.fixture
def jupyter_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Environment confining Jupyter to tmp_path; also applied to this process."""
    prefix = tmp_path / "prefix"
    env = {
        "HOME": str(tmp_path / "home"),
        "JUPYTER_DATA_DIR": str(tmp_path / "data"),
        "JUPYTER_CONFIG_DIR": str(tmp_path / "config"),
        "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"),
        "JUPYTER_PATH": str(prefix / "share" / "jupyter"),
        "IPYTHONDIR": str(tmp_path / "ipython"),
        "PYTHONPATH": os.pathsep.join(
            p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p
        ),
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("JUPYTER_PREFER_ENV_PATH", raising=False)
    return {**os.environ, **env}


@pytest.fixture
def prefix(tmp_path: Path) -> Path:
    return tmp_path / "prefix"


def run_cli(
    env: dict[str, str], *args: str, input: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *args],
        cwd=REPO,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=60,
    )


def kernel_dir(prefix: Path, name: str = "pyrepl3") -> Path:
    return prefix / "share" / "jupyter" / "kernels" / name


def install(env: dict[str, str], prefix: Path, *args: str) -> subprocess.CompletedProcess[str]:
    result = run_cli(env, "install", "--prefix", str(prefix), *args)
    assert result.returncode == 0, result.stderr
    return result


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    return width, height


def test_version(jupyter_env: dict[str, str]) -> None:
    result = run_cli(jupyter_env, "--version")
    assert result.returncode == 0
    assert result.stdout == f"pyrepl3-kernel {__version__}\n"


def test_no_subcommand_prints_help_and_exits_2(jupyter_env: dict[str, str]) -> None:
    result = run_cli(jupyter_env)
    assert result.returncode == 2
    out = result.stdout + result.stderr
    assert "usage: pyrepl3-kernel" in out
    assert "install" in out and "uninstall" in out


def test_install_writes_kernel_json_and_logos(jupyter_env: dict[str, str], prefix: Path) -> None:
    result = install(jupyter_env, prefix)
    dest = kernel_dir(prefix)
    assert str(dest) in result.stdout

    spec = json.loads((dest / "kernel.json").read_text())
    assert spec == {
        "argv": [sys.executable, "-m", "pyrepl3_kernel", "-f", "{connection_file}"],
        "display_name": "PyREPL3",
        "language": "python",
        "interrupt_mode": "message",
        "metadata": {
            "debugger": False,
            "pyrepl3": {"version": __version__},
            "kernel_provisioner": {"provisioner_name": "pyrepl3-pool", "config": {}},
        },
    }
    for logo in LOGOS:
        assert (dest / logo).is_file()
    assert png_size(dest / "logo-32x32.png") == (32, 32)
    assert png_size(dest / "logo-64x64.png") == (64, 64)
    assert (dest / "logo-svg.svg").read_text().lstrip().startswith("<?xml")


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_installed_spec_is_world_readable(jupyter_env: dict[str, str], prefix: Path) -> None:
    install(jupyter_env, prefix)
    mode = stat.S_IMODE(kernel_dir(prefix).stat().st_mode)
    assert mode & 0o055 == 0o055, oct(mode)


def test_kernel_spec_manager_finds_install(jupyter_env: dict[str, str], prefix: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager, find_kernel_specs

    install(jupyter_env, prefix)
    assert find_kernel_specs()["pyrepl3"] == str(kernel_dir(prefix))
    spec = KernelSpecManager().get_kernel_spec("pyrepl3")
    assert spec.display_name == "PyREPL3"
    assert spec.language == "python"
    assert spec.interrupt_mode == "message"
    assert spec.argv[0] == sys.executable
    assert spec.metadata["pyrepl3"]["version"] == __version__


def test_name_and_display_name(jupyter_env: dict[str, str], prefix: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    result = install(jupyter_env, prefix, "--name", "Other-PyREPL3", "--display-name", "My REPL")
    # Jupyter lowercases kernel names.
    dest = kernel_dir(prefix, "other-pyrepl3")
    assert str(dest) in result.stdout
    assert json.loads((dest / "kernel.json").read_text())["display_name"] == "My REPL"
    assert not kernel_dir(prefix).exists()

    specs = KernelSpecManager().find_kernel_specs()
    assert specs["other-pyrepl3"] == str(dest)
    # (a `pyrepl3` spec may exist elsewhere, e.g. the one setup.sh installs)
    assert not specs.get("pyrepl3", "").startswith(str(prefix))


def test_env_option(jupyter_env: dict[str, str], prefix: Path) -> None:
    install(jupyter_env, prefix, "--env", "A=1", "B=x=y", "--env", "EMPTY=")
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert spec["env"] == {"A": "1", "B": "x=y", "EMPTY": ""}


def test_bad_env_is_a_usage_error(jupyter_env: dict[str, str], prefix: Path) -> None:
    result = run_cli(jupyter_env, "install", "--prefix", str(prefix), "--env", "NOEQUALS")
    assert result.returncode == 2
    assert "KEY=VALUE" in result.stderr
    assert not kernel_dir(prefix).exists()


def test_invalid_name(jupyter_env: dict[str, str], prefix: Path) -> None:
    result = run_cli(jupyter_env, "install", "--prefix", str(prefix), "--name", "bad name")
    assert result.returncode == 1
    assert "Invalid kernel name" in result.stderr


def test_user_install(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    result = run_cli(jupyter_env, "install", "--user")
    assert result.returncode == 0, result.stderr
    dest = tmp_path / "data" / "kernels" / "pyrepl3"
    assert (dest / "kernel.json").is_file()
    assert str(dest) in result.stdout


def test_location_options_are_exclusive(jupyter_env: dict[str, str], prefix: Path) -> None:
    result = run_cli(jupyter_env, "install", "--user", "--prefix", str(prefix))
    assert result.returncode == 2
    assert "not allowed with" in result.stderr


def test_prefix_outside_search_path_warns(jupyter_env: dict[str, str], tmp_path: Path) -> None:
    other = tmp_path / "elsewhere"
    result = install(jupyter_env, other)
    assert "JUPYTER_PATH" in result.stderr
    assert (kernel_dir(other) / "kernel.json").is_file()


def test_sys_prefix_uses_sys_prefix(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """--sys-prefix passes prefix=sys.prefix (checked in-process, without writing there)."""
    from jupyter_client.kernelspec import KernelSpecManager

    from pyrepl3_kernel import cli

    calls = []

    def fake_install(self, source_dir, kernel_name=None, user=False, replace=None, prefix=None):
        calls.append((sorted(os.listdir(source_dir)), kernel_name, user, prefix))
        return str(tmp_path / "fake" / kernel_name)

    monkeypatch.setattr(KernelSpecManager, "install_kernel_spec", fake_install)
    assert cli.main(["install", "--sys-prefix"]) == 0
    assert calls == [(sorted(["kernel.json", *LOGOS]), "pyrepl3", False, sys.prefix)]


def test_uninstall(jupyter_env: dict[str, str], prefix: Path) -> None:
    from jupyter_client.kernelspec import KernelSpecManager

    install(jupyter_env, prefix)
    result = run_cli(jupyter_env, "uninstall", "-y")
    assert result.returncode == 0, result.stderr
    assert str(kernel_dir(prefix)) in result.stdout
    assert not kernel_dir(prefix).exists()
    assert not KernelSpecManager().find_kernel_specs().get("pyrepl3", "").startswith(str(prefix))


def test_uninstall_by_name(jupyter_env: dict[str, str], prefix: Path) -> None:
    install(jupyter_env, prefix)
    install(jupyter_env, prefix, "--name", "second")
    result = run_cli(jupyter_env, "uninstall", "--name", "SECOND", "-y")
    assert result.returncode == 0, result.stderr
    assert not kernel_dir(prefix, "second").exists()
    assert kernel_dir(prefix).exists()


def test_uninstall_asks_for_confirmation(jupyter_env: dict[str, str], prefix: Path) -> None:
    install(jupyter_env, prefix)
    result = run_cli(jupyter_env, "uninstall", input="n\n")
    assert result.returncode == 1
    assert "aborted" in result.stderr
    assert kernel_dir(prefix).exists()

    result = run_cli(jupyter_env, "uninstall", input="y\n")
    assert result.returncode == 0, result.stderr
    assert not kernel_dir(prefix).exists()


def test_uninstall_missing(jupyter_env: dict[str, str]) -> None:
    result = run_cli(jupyter_env, "uninstall", "--name", "not-there", "-y")
    assert result.returncode == 1
    assert "not-there" in result.stderr
    assert "not installed" in result.stderr
    assert result.stdout == ""


def test_reference_kernelspec_is_current() -> None:
    """kernelspec/ holds what install writes (with "python" as argv[0]) and the same logos."""
    from pyrepl3_kernel.cli import kernel_spec_dict

    ref = REPO / "kernelspec"
    assert json.loads((ref / "kernel.json").read_text()) == kernel_spec_dict("python", pool={})
    for logo in LOGOS:
        packaged = REPO / "pyrepl3_kernel" / "resources" / logo
        assert (ref / logo).read_bytes() == packaged.read_bytes(), logo


def test_pool_options_shape_the_provisioner_config(
    jupyter_env: dict[str, str], prefix: Path
) -> None:
    install(jupyter_env, prefix, "--pool-size", "3", "--warmup-code", "import json")
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"] == {
        "provisioner_name": "pyrepl3-pool",
        "config": {"pool_size": 3, "warmup_code": "import json"},
    }


def test_no_pool_writes_a_plain_kernelspec(jupyter_env: dict[str, str], prefix: Path) -> None:
    install(jupyter_env, prefix, "--no-pool")
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert "kernel_provisioner" not in spec["metadata"]
    result = run_cli(
        jupyter_env, "install", "--prefix", str(prefix), "--no-pool", "--pool-size", "2"
    )
    assert result.returncode == 1
    assert "--no-pool" in result.stderr
