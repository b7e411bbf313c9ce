"""What an install puts in site-packages: the `wemoe` package (the repository's `conversion/` folder, with the
model-card templates of `model_cards/`) and the artifacts' `modeling_wemoe`; no generic top-level name."""

import importlib.metadata
import subprocess
import sys
import zipfile
from pathlib import Path

import wemoe

ROOT = Path(__file__).resolve().parents[1]


def test_import_wemoe_is_the_api():
    assert wemoe.__version__ == importlib.metadata.version("wemoe")
    for name in ("merge", "merge_clip", "merge_t5", "convert", "adapt_artifact", "evaluate", "load_recipe"):
        assert callable(getattr(wemoe, name)), name


def test_the_wheel_installs_only_wemoe_and_modeling_wemoe(tmp_path):
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--quiet", "--wheel-dir", str(tmp_path)],
        check=True,
    )
    (wheel,) = tmp_path.glob("wemoe-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"wemoe", "modeling_wemoe"}
    assert "wemoe/model_cards/wemoe.md" in names
    entry_points = next(name for name in names if name.endswith(".dist-info/entry_points.txt"))
    assert "wemoe-convert = wemoe.cli.convert:main" in zipfile.ZipFile(wheel).read(entry_points).decode()
