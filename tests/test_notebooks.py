"""Notebooks run through nbclient and papermill: pyrepl3 against ipykernel.

The differential tests run one notebook on ``python3`` (ipykernel, the
reference) and on ``pyrepl3``, normalize what legitimately differs (see
:func:`normalize`), and require the rest to be equal, feature by feature.
A few absolute checks make sure both kernels did not merely agree on a
wrong result.
"""

from __future__ import annotations

import base64
import copy
import re
import struct
import time
import zlib
from pathlib import Path
from typing import Any

import nbformat
import pytest
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError
from nbformat import NotebookNode

pytestmark = pytest.mark.usefixtures("pyrepl3_kernelspec")

KERNELS = ("python3", "pyrepl3")
CELL_TIMEOUT = 60


def tiny_png() -> bytes:
    """A valid 1x1 RGBA PNG, built by hand."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 6, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00\xff")
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", pixels) + chunk(b"IEND", b"")
    )


PNG = tiny_png()

#: (feature, cell source), run in this order in one notebook.
CELLS: list[tuple[str, str]] = [
    ("unicode", "print('héllo wörld ☃ 日本語 🐍')\n'ünïcode ✓'"),
    (
        "rich_display",
        "from IPython.display import HTML, JSON, Image, Markdown, Math, clear_output, display\n"
        "display(HTML('<b>bold</b>'))\n"
        "display(Markdown('# Title'))\n"
        "display(JSON({'a': [1, 2, 3]}))\n"
        "display(Math(r'\\frac{1}{2}'))",
    ),
    ("png", f"import base64\nImage(data=base64.b64decode('{base64.b64encode(PNG).decode()}'))"),
    ("update_display", "handle = display('first', display_id=True)\nhandle.update('second')"),
    ("clear_output", "print('gone')\nclear_output()\nprint('kept')"),
    (
        "clear_output_wait",
        "for i in range(3):\n    clear_output(wait=True)\n    print(f'step {i}')",
    ),
    ("error", "1/0"),
    ("error_nested", "def fail():\n    raise ValueError('deep')\nfail()"),
    ("magic_time", "%time total = sum(range(10))"),
    ("magic_capture", "%%capture captured\nprint('hidden')\n'also hidden'"),
    ("magic_capture", "captured.stdout"),
    ("magic_who", "%who"),
    ("shell_escape", "!echo shell"),
    ("top_level_await", "import asyncio\nawait asyncio.sleep(0.01)\n'awaited'"),
    ("stderr", "import sys\nprint('to stderr', file=sys.stderr)"),
    (
        "widgets",
        "import ipywidgets\nslider = ipywidgets.IntSlider(value=3, description='n')\nslider",
    ),
    # nbclient answers the Output widget's capture with a comm_msg on shell;
    # sending on the shell socket while an execute_reply arrives on it can
    # leave nbclient's poll asleep until the cell timeout (jupyter/nbclient
    # #312, a client bug). The pause keeps this fast kernel's reply clear of
    # that send.
    (
        "widgets",
        "out = ipywidgets.Output()\ndisplay(out)\nwith out:\n    print('inside')\n"
        "import time\ntime.sleep(0.5)",
    ),
    ("update_display", "handle.update('third')"),  # updates the output of an earlier cell
    ("pretty_print", "{'b': list(range(30)), 'a': 'x' * 10}"),
    ("repr_address", "class Foo:\n    pass\nFoo()"),
    ("shell_class", "get_ipython().__class__.__name__"),
    ("working_directory", "import os\nos.path.exists('marker.txt')"),
    ("stdin", "input('never answered: ')"),
]
FEATURES = sorted({feature for feature, _ in CELLS})


def build_notebook() -> NotebookNode:
    nb = nbformat.v4.new_notebook()
    for feature, source in CELLS:
        nb.cells.append(nbformat.v4.new_code_cell(source, metadata={"feature": feature}))
    return nb


def run_notebook(nb: NotebookNode, kernel_name: str, cwd: Path, **kwargs: Any) -> NotebookNode:
    nb = copy.deepcopy(nb)
    client = NotebookClient(
        nb,
        kernel_name=kernel_name,
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(cwd)}},
        **kwargs,
    )
    client.execute()
    return nb


# -- normalization -------------------------------------------------------------------

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")
ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
# %time: "CPU times: user 5 µs, sys: 1e+03 ns, total: 6 µs" / "Wall time: 7.15 µs"
DURATION = re.compile(r"\d+(\.\d+)?(e[+-]?\d+)?\s*(ns|µs|μs|us|ms|s)\b")


def merge_streams(outputs: list[Any]) -> list[Any]:
    merged: list[Any] = []
    for out in outputs:
        if (
            out["output_type"] == "stream"
            and merged
            and merged[-1]["output_type"] == "stream"
            and merged[-1]["name"] == out["name"]
        ):
            merged[-1] = {**merged[-1], "text": merged[-1]["text"] + out["text"]}
        else:
            merged.append(dict(out))
    return merged


def normalize_traceback(lines: list[str]) -> list[str]:
    kept = []
    for line in lines:
        plain = ANSI.sub("", line)
        # Frames in library files name the kernel's own code (ipykernel's
        # kernelbase.py against pyrepl3's worker), so only the user's cells
        # ("Cell In[n], line k") and the summary lines are compared.
        if plain.startswith("File "):
            continue
        kept.append(plain)
    return kept


def normalize(nb: NotebookNode) -> dict[str, Any]:
    """The comparable part of an executed notebook.

    What is normalized, and why it may legitimately differ:
    - cell metadata ``execution`` (nbclient's timestamps): timing.
    - consecutive stream outputs of one stream are joined: how output is cut
      into messages is timing (ipykernel batches every 0.2 s; pyrepl3 sends
      at once); nbformat and every frontend show them joined.
    - ``0x...`` addresses in reprs: allocation.
    - tracebacks: ANSI colors removed (IPython's highlighting of the failing
      expression depends on the shell's color setup) and frames in library
      files dropped (they name the kernel's own code, e.g. ipykernel's
      ``raw_input`` against pyrepl3's worker); ename/evalue stay exact.
    - durations printed by ``%time``: timing.
    - widget model ids (random uuids): replaced by ``model-N`` in order of
      first appearance.
    - notebook metadata other than ``language_info`` and the widget state:
      ``kernelspec`` names the kernel that ran, which is the point.
    """
    cells = []
    for cell in nb.cells:
        outputs = []
        for out in merge_streams(cell.get("outputs", [])):
            if out["output_type"] == "stream":
                out["text"] = DURATION.sub("<duration>", out["text"])
            if out["output_type"] == "error":
                out["traceback"] = normalize_traceback(out["traceback"])
            outputs.append(out)
        cells.append(
            {
                "feature": cell.metadata.get("feature"),
                "execution_count": cell.get("execution_count"),
                "outputs": outputs,
            }
        )
    widgets = nb.metadata.get("widgets", {}).get("application/vnd.jupyter.widget-state+json", {})
    result = {"cells": cells, "language_info": nb.metadata.get("language_info"), "widgets": widgets}
    text = nbformat.writes(nbformat.from_dict({**_empty_nb(), "metadata": {"result": result}}))
    text = ADDRESS.sub("0x<address>", text)
    for n, model_id in enumerate(_model_ids(widgets, cells)):
        text = text.replace(model_id, f"model-{n}")
    out: dict[str, Any] = nbformat.reads(text, as_version=4).metadata["result"]
    return out


def _empty_nb() -> dict[str, Any]:
    return dict(nbformat.v4.new_notebook())


def _model_ids(widgets: dict[str, Any], cells: list[dict[str, Any]]) -> list[str]:
    ids: list[str] = []
    for cell in cells:
        for out in cell["outputs"]:
            view = out.get("data", {}).get("application/vnd.jupyter.widget-view+json")
            if view and view["model_id"] not in ids:
                ids.append(view["model_id"])
    for model_id in widgets.get("state", {}):
        if model_id not in ids:
            ids.append(model_id)
    return ids


# -- the differential run ----------------------------------------------------------------


@pytest.fixture(scope="module")
def executed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The notebook run on each kernel (allow_errors), normalized."""
    cwd = tmp_path_factory.mktemp("notebook-cwd")
    (cwd / "marker.txt").write_text("the kernel runs in the notebook's directory\n")
    nb = build_notebook()
    return {name: normalize(run_notebook(nb, name, cwd, allow_errors=True)) for name in KERNELS}


def cells_of(result: dict[str, Any], feature: str) -> list[dict[str, Any]]:
    return [cell for cell in result["cells"] if cell["feature"] == feature]


@pytest.mark.parametrize("feature", FEATURES)
def test_outputs_match_ipykernel(executed: dict[str, dict[str, Any]], feature: str) -> None:
    expected = cells_of(executed["python3"], feature)
    actual = cells_of(executed["pyrepl3"], feature)
    assert expected, f"no cell for {feature}"
    assert actual == expected


def test_widget_state_matches_ipykernel(executed: dict[str, dict[str, Any]]) -> None:
    expected, actual = executed["python3"]["widgets"], executed["pyrepl3"]["widgets"]
    assert expected["state"], "ipykernel recorded no widget state"
    assert actual == expected


def test_language_info_matches_ipykernel(executed: dict[str, dict[str, Any]]) -> None:
    assert executed["pyrepl3"]["language_info"] == executed["python3"]["language_info"]


def single_output(result: dict[str, Any], feature: str, index: int = 0) -> dict[str, Any]:
    outputs = cells_of(result, feature)[index]["outputs"]
    assert len(outputs) == 1, outputs
    return outputs[0]


def test_pyrepl3_outputs_are_what_the_cells_say(executed: dict[str, dict[str, Any]]) -> None:
    """Absolute checks: agreeing with ipykernel must also mean being right."""
    result = executed["pyrepl3"]
    unicode = cells_of(result, "unicode")[0]["outputs"]
    assert unicode[0]["text"] == "héllo wörld ☃ 日本語 🐍\n"
    assert unicode[1]["data"]["text/plain"] == "'ünïcode ✓'"
    rich = cells_of(result, "rich_display")[0]["outputs"]
    mimes = [sorted(set(out["data"]) - {"text/plain"}) for out in rich]
    assert mimes == [["text/html"], ["text/markdown"], ["application/json"], ["text/latex"]]
    png = single_output(result, "png")
    assert base64.b64decode(png["data"]["image/png"]) == PNG
    assert single_output(result, "update_display")["data"]["text/plain"] == "'third'"
    assert single_output(result, "clear_output")["text"] == "kept\n"
    assert single_output(result, "clear_output_wait")["text"] == "step 2\n"
    assert single_output(result, "error")["ename"] == "ZeroDivisionError"
    assert single_output(result, "magic_time")["text"].startswith("CPU times: user <duration>")
    assert cells_of(result, "magic_capture")[0]["outputs"] == []
    assert single_output(result, "magic_capture", 1)["data"]["text/plain"] == "'hidden\\n'"
    assert "captured" in single_output(result, "magic_who")["text"].split()
    # IPython runs "!" commands on a pty (pexpect), hence "\r\n" in both kernels.
    assert single_output(result, "shell_escape")["text"].splitlines() == ["shell"]
    assert single_output(result, "top_level_await")["data"]["text/plain"] == "'awaited'"
    assert single_output(result, "stderr") == {
        "name": "stderr",
        "output_type": "stream",
        "text": "to stderr\n",
    }
    assert (
        single_output(result, "repr_address")["data"]["text/plain"]
        == "<__main__.Foo at 0x<address>>"
    )
    assert single_output(result, "working_directory")["data"]["text/plain"] == "True"
    assert single_output(result, "stdin")["ename"] == "StdinNotImplementedError"
    slider = single_output(result, "widgets", 0)
    assert slider["data"]["application/vnd.jupyter.widget-view+json"]["model_id"] == "model-0"
    # nbclient routes the output printed inside the Output widget into its state.
    output_model = result["widgets"]["state"]["model-1"]["state"]
    assert output_model["_model_name"] == "OutputModel"
    assert output_model["outputs"] == [
        {"name": "stdout", "output_type": "stream", "text": "inside\n"}
    ]
    assert result["widgets"]["state"]["model-0"]["state"]["value"] == 3


def test_normalization_keeps_real_differences() -> None:
    """The normalization must not hide a wrong output."""
    nb = build_notebook()
    nb.cells = nb.cells[:1]
    nb.cells[0].outputs = [
        nbformat.v4.new_output("stream", name="stdout", text="at 0x7f00 took 5 ms\n")
    ]
    other = copy.deepcopy(nb)
    other.cells[0].outputs[0]["text"] = "at 0x7f99 took 1e+03 ns\n"
    assert normalize(nb) == normalize(other)
    other.cells[0].outputs[0]["text"] = "at 0x7f99 took 7.5 µs!\n"
    assert normalize(nb) != normalize(other)


# -- stdin and papermill ------------------------------------------------------------------


def test_input_in_nbclient_fails_at_once(tmp_path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("x = input('name? ')"),
        nbformat.v4.new_code_cell("print('unreached')"),
    ]
    started = time.monotonic()
    with pytest.raises(CellExecutionError) as info:
        # A hang would end at the 60 s cell timeout with a different error.
        run_notebook(nb, "pyrepl3", tmp_path)
    elapsed = time.monotonic() - started
    assert "StdinNotImplementedError" in str(info.value)
    assert elapsed < 20, f"input() took {elapsed:.1f} s to fail"


def test_papermill_injects_parameters(tmp_path: Path) -> None:
    import papermill

    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(
        "greeting = 'hello'\ntimes = 1\nscale = 1.0", metadata={"tags": ["parameters"]}
    )
    body = nbformat.v4.new_code_cell("print(' '.join([greeting] * times))\nscale * times")
    nb.cells = [params, body]
    nb.metadata["kernelspec"] = {"name": "pyrepl3", "display_name": "PyREPL3", "language": "python"}
    source, target = tmp_path / "in.ipynb", tmp_path / "out.ipynb"
    nbformat.write(nb, source)
    papermill.execute_notebook(
        str(source),
        str(target),
        parameters={"greeting": "héllo pyrepl3", "times": 3, "scale": 0.5},
        kernel_name="pyrepl3",
        progress_bar=False,
        log_output=False,
        cwd=str(tmp_path),
    )
    out = nbformat.read(target, as_version=4)
    assert [c.metadata.get("tags", []) for c in out.cells] == [
        ["parameters"],
        ["injected-parameters"],
        [],
    ]
    assert "times = 3" in out.cells[1].source
    result = merge_streams(out.cells[2].outputs)
    assert result[0]["text"] == "héllo pyrepl3 héllo pyrepl3 héllo pyrepl3\n"
    assert result[1]["data"]["text/plain"] == "1.5"
    assert out.metadata.papermill["parameters"] == {
        "greeting": "héllo pyrepl3",
        "times": 3,
        "scale": 0.5,
    }
    assert out.metadata.papermill["exception"] is None
    assert out.metadata.kernelspec["name"] == "pyrepl3"
