"""jupyter_server's GatewayClient in front of ``pyrepl3-kernel gateway``.

A remote-kernel setup: ``pyrepl3-kernel gateway`` (the "gateway", kernels
leased from its daemon) and a second ``jupyter server --gateway-url`` (the
"front", with its own token), once stock (the pyrepl3 extension off, as a
machine without pyrepl3 runs it) and once with the extension on. A notebook's worth of cells goes
through the front's REST and WebSocket API only: outputs, ``input()``
answered over the WebSocket, interrupt, restart, a worker crash. Checkpoints
are saved and restored through the gateway's own /api/pyrepl3 endpoints
(GatewayClient does not proxy extension endpoints; a front with the pyrepl3
extension forwards them itself). The ``KERNEL_*``
variables of the front's environment and the ``KERNEL_WORKING_DIR`` it
derives from the notebook's path reach the kernel.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_rest_api import JupyterServer, KernelWS, running_server, server_env, sse


@pytest.fixture(scope="module")
def gateway(
    pyrepl3_kernelspec: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    with running_server("gateway", tmp_path_factory.mktemp("gw-gateway")) as server:
        yield server


@pytest.fixture(scope="module", params=["stock", "with-extension"])
def front(
    request: pytest.FixtureRequest, gateway: JupyterServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[JupyterServer]:
    """``stock``: the pyrepl3 extension off, as on a machine without pyrepl3;
    ``with-extension``: on, as ``jupyter lab --gateway-url`` runs where
    pyrepl3-kernel is installed (its kernel handlers then front the gateway)."""
    base = tmp_path_factory.mktemp("gw-front")
    (base / "root" / "project").mkdir(parents=True)
    env = server_env(base, KERNEL_FOO="from the front", KERNEL_BAR="bar", NOT_FORWARDED="no")
    enabled = request.param != "stock"
    config = {"ServerApp": {"jpserver_extensions": {"pyrepl3_kernel.server": enabled}}}
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.json").write_text(json.dumps(config))
    with running_server(
        "server",
        base,
        f"--gateway-url={gateway.url}",
        f"--GatewayClient.auth_token={gateway.token}",
        "--GatewayClient.request_timeout=60",
        f"--ServerApp.root_dir={base / 'root'}",
        env=env,
        name=f"front-{request.param}",
    ) as server:
        yield server


def test_front_is_in_gateway_mode(front: JupyterServer, gateway: JupyterServer) -> None:
    extension = front.name == "front-with-extension"
    assert front.api("GET", "/api/pyrepl3/pool").status_code == (200 if extension else 404)
    assert gateway.api("GET", "/api/kernelspecs").json()["default"] == "pyrepl3"
    # The front lists the gateway's kernelspecs (ours are not on its own path).
    specs = front.api("GET", "/api/kernelspecs").json()
    assert {"pyrepl3", "pyrepl3-cold"} <= set(specs["kernelspecs"])
    assert "Kernels will be managed by the Gateway server" in front.log(100_000)


def test_a_notebook_through_the_front(front: JupyterServer, gateway: JupyterServer) -> None:
    r = front.api("POST", "/api/kernels", {"name": "pyrepl3", "path": "project/analysis.ipynb"})
    assert r.status_code == 201, r.text
    kid = r.json()["id"]
    # The front proxies: the gateway has the same kernel.
    assert gateway.api("GET", f"/api/kernels/{kid}").status_code == 200
    try:
        with KernelWS(front, kid) as ws:
            info = ws.wait_ready()
            assert info["implementation"] == "pyrepl3"

            # Outputs: stream, display_data, execute_result, error.
            r1 = ws.execute("print('hello from the front')")
            assert r1.status == "ok" and r1.stdout == "hello from the front\n"
            r2 = ws.execute("from IPython.display import HTML, display\ndisplay(HTML('<i>it</i>'))")
            assert r2.of_type("display_data")[0]["data"]["text/html"] == "<i>it</i>"
            r3 = ws.execute("6 * 7")
            assert r3.of_type("execute_result")[0]["data"]["text/plain"] == "42"
            r4 = ws.execute("1 / 0")
            assert r4.status == "error" and r4.reply["ename"] == "ZeroDivisionError"
            assert r4.of_type("error")[0]["ename"] == "ZeroDivisionError"

            # KERNEL_* of the front's environment and the notebook's directory.
            r5 = ws.execute(
                "import os\n"
                "print(os.getcwd())\n"
                "print(os.environ.get('KERNEL_FOO'), os.environ.get('KERNEL_BAR'), "
                "os.environ.get('NOT_FORWARDED'))"
            )
            cwd, env_line = r5.stdout.splitlines()
            assert Path(cwd) == front.base / "root" / "project"
            assert env_line == "from the front bar None"

            # input() answered with an input_reply over the WebSocket.
            r6 = ws.execute(
                "name = input('who? ')\nprint('hi', name)", stdin=lambda prompt: "Grace"
            )
            assert r6.prompts == ["who? "]
            assert r6.status == "ok" and r6.stdout == "hi Grace\n"

            # Interrupt through the front's REST API.
            timer = threading.Timer(1.0, lambda: front.api("POST", f"/api/kernels/{kid}/interrupt"))
            start = time.monotonic()
            timer.start()
            try:
                r7 = ws.execute(
                    "import time\nprint('sleeping', flush=True)\ntime.sleep(60)", timeout=30
                )
            finally:
                timer.cancel()
            assert time.monotonic() - start < 15
            assert r7.status == "error" and r7.reply["ename"] == "KeyboardInterrupt"
            assert r7.stdout == "sleeping\n"

            # Checkpoint through the gateway's own endpoints.
            assert ws.execute("x = 41 + 1; words = ['a', 'b']").status == "ok"
            base = f"/api/pyrepl3/kernels/{kid}/checkpoints"
            # Its own name: both fronts' kernels share the gateway's store, and
            # a checkpoint another kernel saved is not replaced without force.
            name = f"nb-{front.name}"
            r = gateway.api("POST", base, {"name": name})
            assert r.status_code == 201, r.text
            assert {"x", "words"} <= set(r.json()["saved"])

            # Restart through the front: a fresh namespace.
            r = front.api("POST", f"/api/kernels/{kid}/restart")
            assert r.status_code == 200, r.text
            ws.wait_ready()
            r8 = ws.execute("print('x' in globals(), 'words' in globals())")
            assert r8.stdout == "False False\n"

            # Restore the checkpoint into the restarted kernel.
            r = gateway.api("POST", f"{base}/{name}/restore", {})
            assert r.status_code == 200, r.text
            r9 = ws.execute("print(x, words)")
            assert r9.stdout == "42 ['a', 'b']\n"

            # A worker crash: an error on the cell, no dead kernel.
            r10 = ws.execute("import os; os._exit(3)")
            assert r10.status == "error" and r10.reply["ename"] == "WorkerDied"
            assert "3" in r10.reply["evalue"]
            r11 = ws.execute("print('after the crash')")
            assert r11.stdout == "after the crash\n"
            assert gateway.api("GET", f"/api/pyrepl3/kernels/{kid}/health").json()["pyrepl3"][
                "last_crash"
            ]
    finally:
        r = front.api("DELETE", f"/api/kernels/{kid}")
    assert r.status_code == 204, r.text
    assert gateway.api("GET", f"/api/kernels/{kid}").status_code == 404


def test_pyrepl3_endpoints_on_the_front(front: JupyterServer, gateway: JupyterServer) -> None:
    """A stock front has no /api/pyrepl3 (GatewayClient proxies no extension
    endpoints); with the extension, the front forwards them to the gateway
    (SSE streamed through), behind its own token."""
    kid = front.start_kernel("pyrepl3", path="project/x.ipynb")
    try:
        r = front.api("POST", f"/api/pyrepl3/kernels/{kid}/execute", {"code": "y = 6 * 7; y"})
        if front.name == "front-stock":
            assert r.status_code == 404
            return
        assert r.status_code == 200, r.text
        assert r.json()["outputs"][0]["data"]["text/plain"] == "42"
        events = sse(
            front, kid, "import time\nfor i in range(2):\n    print(i, flush=True); time.sleep(0.5)"
        )
        stdout = [e for e in events if e.kind == "output" and e.data.get("name") == "stdout"]
        assert [e.data["text"] for e in stdout] == ["0\n", "1\n"], events
        assert events[0].kind == "started" and events[-1].kind == "done", events
        assert stdout[1].at - stdout[0].at > 0.3, "the events came through in one piece"
        pool = front.api("GET", "/api/pyrepl3/pool").json()
        assert kid in [lease["kernel_id"] for lease in pool["leases"]]  # the gateway's daemon
        r = front.api("POST", f"/api/pyrepl3/kernels/{kid}/checkpoints", {"name": "via-front"})
        assert r.status_code == 201 and "y" in r.json()["saved"]
        r = front.api("GET", f"/api/pyrepl3/kernels/{kid}/checkpoints/nope")
        assert r.status_code == 404 and "no checkpoint named" in r.json()["message"]
        r = front.api("DELETE", f"/api/pyrepl3/kernels/{kid}/checkpoints/via-front")
        assert r.status_code == 204
        assert front.api("GET", "/api/pyrepl3/pool", token=False).status_code == 403
        assert front.api("GET", "/api/pyrepl3/kernels/nope/health").status_code == 404
        # The extension's kernel start, fronting the gateway: an unknown name is 404.
        assert front.api("POST", "/api/kernels", {"name": "no-such-kernel"}).status_code == 404
    finally:
        front.api("DELETE", f"/api/kernels/{kid}")


def test_server_logs_have_no_tracebacks(front: JupyterServer, gateway: JupyterServer) -> None:
    for server in (front, gateway):
        log = server.log(10_000_000)
        assert "Traceback" not in log, f"{server.name}:\n{log[log.find('Traceback') - 500 :]}"
