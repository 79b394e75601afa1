"""Regenerate the PyREPL3 kernel logos.

Draws a rounded indigo square with a white "P" and a gold "3" using
matplotlib (text is converted to paths, so the SVG needs no fonts), then
writes::

    pyrepl3_kernel/resources/logo-32x32.png
    pyrepl3_kernel/resources/logo-64x64.png
    pyrepl3_kernel/resources/logo-svg.svg

and copies the three files into ``kernelspec/`` beside ``kernel.json``.
The PNGs are rendered large and downsampled with Pillow for clean edges.

Usage::

    python kernelspec/make_logos.py
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from PIL import Image  # noqa: E402

HERE = Path(__file__).resolve().parent
RESOURCES = HERE.parent / "pyrepl3_kernel" / "resources"

BACKGROUND = "#3b2a98"  # deep indigo
EDGE = "#26196b"
LETTER = "#ffffff"
ACCENT = "#ffc53d"  # gold
PNG_SIZES = (32, 64)
RENDER_SIZE = 512


def draw() -> Figure:
    """Draw the logo on a 1x1 inch transparent figure with unit axes."""
    plt.rcParams["svg.fonttype"] = "path"
    plt.rcParams["svg.hashsalt"] = "pyrepl3"  # stable ids in the SVG
    fig = plt.figure(figsize=(1, 1))
    fig.patch.set_alpha(0.0)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_axis_off()
    ax.patch.set_alpha(0.0)

    pad = 0.035
    ax.add_patch(
        FancyBboxPatch(
            (pad, pad),
            1 - 2 * pad,
            1 - 2 * pad,
            boxstyle="round,pad=0,rounding_size=0.2",
            facecolor=BACKGROUND,
            edgecolor=EDGE,
            linewidth=1.2,
        )
    )
    font = {"fontfamily": "DejaVu Sans", "fontweight": "bold", "ha": "center", "va": "center"}
    # Font sizes are in points; the figure is 72 points wide.
    ax.text(0.40, 0.47, "P", color=LETTER, fontsize=50, **font)
    ax.text(0.765, 0.60, "3", color=ACCENT, fontsize=30, **font)
    return fig


def write_png(fig: Figure, size: int, path: Path) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=RENDER_SIZE, transparent=True)
    buf.seek(0)
    with Image.open(buf) as big:
        big.convert("RGBA").resize((size, size), Image.Resampling.LANCZOS).save(path, optimize=True)


def write_svg(fig: Figure, path: Path) -> None:
    # metadata Date=None keeps the output reproducible.
    fig.savefig(path, format="svg", transparent=True, metadata={"Date": None})


def main() -> None:
    RESOURCES.mkdir(parents=True, exist_ok=True)
    fig = draw()
    outputs = []
    for size in PNG_SIZES:
        out = RESOURCES / f"logo-{size}x{size}.png"
        write_png(fig, size, out)
        outputs.append(out)
    svg = RESOURCES / "logo-svg.svg"
    write_svg(fig, svg)
    outputs.append(svg)
    plt.close(fig)

    for out in outputs:
        shutil.copyfile(out, HERE / out.name)
        print(f"wrote {out.relative_to(HERE.parent)} (+ kernelspec/{out.name})")


if __name__ == "__main__":
    main()
