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
            "debugger": True,  # debugpy comes with ipykernel
            "supported_encryption": ["curve"],
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
    from pyrepl3_kernel.kernelspec import kernel_spec_dict

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


# -- install: bad sizes, replaced and shadowed specs --------------------------


@pytest.mark.parametrize("size", ["-3", "65", "two", "1.5"])
def test_pool_size_out_of_range_is_refused_and_nothing_written(
    jupyter_env: dict[str, str], prefix: Path, size: str
) -> None:
    result = run_cli(jupyter_env, "install", "--prefix", str(prefix), "--pool-size", size)
    assert result.returncode == 2
    assert "--pool-size" in result.stderr
    assert "from 0 to 64" in result.stderr
    assert repr(size) in result.stderr
    assert not kernel_dir(prefix).exists()


@pytest.mark.parametrize("size", [0, 64])
def test_pool_size_bounds_are_accepted(
    jupyter_env: dict[str, str], prefix: Path, size: int
) -> None:
    install(jupyter_env, prefix, "--pool-size", str(size))
    spec = json.loads((kernel_dir(prefix) / "kernel.json").read_text())
    assert spec["metadata"]["kernel_provisioner"]["config"] == {"pool_size": size}


def test_installing_twice_says_it_replaced_the_spec(
    jupyter_env: dict[str, str], prefix: Path
) -> None:
    first = install(jupyter_env, prefix)
    assert first.stdout.startswith("Installed kernel spec 'pyrepl3' (PyREPL3) in ")
    second = install(jupyter_env, prefix, "--display-name", "Again")
    assert second.stdout == f"Replaced kernel spec 'pyrepl3' (Again) in {kernel_dir(prefix)}\n"
    assert json.loads((kernel_dir(prefix) / "kernel.json").read_text())["display_name"] == "Again"

    # A spec written for another Python: the message names the one it started.
    spec_file = kernel_dir(prefix) / "kernel.json"
    spec = json.loads(spec_file.read_text())
    spec["argv"][0] = "/opt/old/bin/python"
    spec_file.write_text(json.dumps(spec))
    third = install(jupyter_env, prefix)
    assert "Replaced kernel spec 'pyrepl3'" in third.stdout
    assert "the old one started /opt/old/bin/python" in third.stdout
    assert json.loads(spec_file.read_text())["argv"][0] == sys.executable


def test_user_install_shadowed_by_an_earlier_spec_warns_naming_the_winner(
    jupyter_env: dict[str, str], prefix: Path, tmp_path: Path
) -> None:
    """JUPYTER_PATH comes first on Jupyter's search path (as .venv's spec does
    in a virtual environment): a --user spec of the same name is never used."""
    from jupyter_client.kernelspec import KernelSpecManager

    install(jupyter_env, prefix)
    result = run_cli(jupyter_env, "install", "--user")
    assert result.returncode == 0, result.stderr
    user_spec = tmp_path / "data" / "kernels" / "pyrepl3"
    assert (user_spec / "kernel.json").is_file()
    assert "Jupyter will not use this spec" in result.stderr
    assert f"the 'pyrepl3' kernel spec in {kernel_dir(prefix)} comes first" in result.stderr
    assert "pyrepl3-kernel uninstall --name pyrepl3" in result.stderr
    # what the warning says is what Jupyter does
    assert KernelSpecManager().find_kernel_specs()["pyrepl3"] == str(kernel_dir(prefix))


def test_install_that_wins_does_not_warn(jupyter_env: dict[str, str]) -> None:
    result = run_cli(jupyter_env, "install", "--user", "--name", "pyrepl3-only-here")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""


# -- gateway without jupyter_server --------------------------------------------

# A plain `pip install pyrepl3-kernel` has no jupyter_server; this venv has it,
# so the child process makes the import fail as it would there.
_WITHOUT_JUPYTER_SERVER = (
    "import sys; sys.modules['jupyter_server'] = None\n"
    "from pyrepl3_kernel.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def test_gateway_without_jupyter_server_says_which_extra_to_install(
    jupyter_env: dict[str, str],
) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_JUPYTER_SERVER, "gateway", "--port", "0"],
        env=jupyter_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert result.stderr.count("\n") == 1, result.stderr
    assert "jupyter_server" in result.stderr
    assert "pip install 'pyrepl3-kernel[server]'" in result.stderr


def test_gateway_help_works_without_jupyter_server(jupyter_env: dict[str, str]) -> None:
    result = subprocess.run(
        [sys.executable, "-c", _WITHOUT_JUPYTER_SERVER, "gateway", "--help"],
        env=jupyter_env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert "usage: pyrepl3-kernel gateway" in result.stdout
    assert "pyrepl3-kernel[server]" in result.stdout


# -- output into a pipe whose reader has gone (`pyrepl3-kernel status | head`) --


@pytest.mark.parametrize("buffered", [True, False], ids=["buffered", "unbuffered"])
@pytest.mark.parametrize(
    "args",
    [("status", "--runtime-dir", "{tmp}"), ("--help",), ("install", "--help")],
    ids=["status", "help", "install-help"],
)
def test_output_into_a_closed_pipe_ends_quietly(
    jupyter_env: dict[str, str], tmp_path: Path, args: tuple[str, ...], buffered: bool
) -> None:
    argv = [a.format(tmp=tmp_path / "runtime") for a in args]
    env = {k: v for k, v in jupyter_env.items() if k != "PYTHONUNBUFFERED"}
    if not buffered:
        env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen(
        [sys.executable, "-m", "pyrepl3_kernel.cli", *argv],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The reader goes before the command has written anything (it is
        # still starting), as `head` does after its lines.
        assert proc.stdout is not None
        proc.stdout.close()
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert stderr == ""
    # 141 as a program killed by SIGPIPE; argparse's help ignores the error.
    assert proc.returncode in (0, 141)
