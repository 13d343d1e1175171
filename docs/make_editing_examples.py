"""Make the example images of docs/editing.md from the quickstart model.

    python docs/make_editing_examples.py [RUN_DIR]

RUN_DIR is a finished quickstart run (default: train recipes/quickstart.toml into a temporary folder, about 21 s
on one CPU thread). The references are 8 glyphs of the synthetic set drawn with another seed than the training
data's; each task's grid (reference | degraded | result per row) is written to docs/images/edit-<task>.png.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "docs" / "images"

TASKS: dict[str, list[str]] = {
    "inpaint": ["--mask-kind", "box"],
    "colorize": [],
    "superres": ["--factor", "2"],
    "stroke": [],
}


def main(argv: list[str]) -> None:
    from typer.testing import CliRunner

    from ctcore.cli import app
    from ctcore.data import synthetic_glyphs
    from ctcore.importers import write_dataset

    def ctcore(*args: object) -> None:
        result = CliRunner().invoke(app, [str(a) for a in args])
        if result.exit_code != 0:
            raise SystemExit(f"ctcore {' '.join(map(str, args))} failed:\n{result.output}")
        print(result.stdout.strip())

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = Path(argv[0]) if argv else tmp / "quickstart"
        if not argv:
            ctcore("run", ROOT / "recipes" / "quickstart.toml", "-o", run, "--no-progress")
        images, labels = synthetic_glyphs(8, 8, seed=12345)  # glyphs the model has not seen
        refs = tmp / "refs.h5"
        write_dataset(refs, images.numpy(), None, {"source": "synthetic glyphs, seed 12345"})
        painting = _stroke_paintings(tmp / "paintings")
        IMAGES.mkdir(parents=True, exist_ok=True)
        for task, extra in TASKS.items():
            source = painting if task == "stroke" else refs
            ctcore("edit", task, run, "--images", source, *extra, "-o", tmp / f"{task}.h5",
                   "--grid", IMAGES / f"edit-{task}.png")
        ctcore("edit", "interpolate", run, "--seeds", "0,1", "--num", 8, "-o", tmp / "interpolate.h5",
               "--grid", IMAGES / "edit-interpolate.png")


def _stroke_paintings(folder: Path) -> Path:
    """Four crude 8x8 paintings: coloured bars and blocks on a dark background, as a user would scribble them."""
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True)
    shapes = [((2, 1, 5, 6), (220, 70, 60)), ((1, 3, 6, 4), (70, 190, 90)), ((2, 2, 5, 5), (80, 110, 230)),
              ((3, 1, 4, 6), (80, 110, 230))]
    for k, (box, colour) in enumerate(shapes):
        img = Image.new("RGB", (8, 8), (20, 20, 20))
        ImageDraw.Draw(img).rectangle(box, fill=colour)
        img.save(folder / f"painting-{k}.png")
    return folder


if __name__ == "__main__":
    main(sys.argv[1:])
