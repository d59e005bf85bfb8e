"""The built wheel installs hf_prope (with hf_prope.patches and hf_prope.recipes) and nothing
generic at the top level, and imports in a fresh virtual environment."""

from __future__ import annotations

import subprocess
import sys
import sysconfig
import venv
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", str(out), str(ROOT)],
        check=True,
        capture_output=True,
        text=True,
    )
    (whl,) = out.glob("hf_prope-*.whl")
    return whl


def test_wheel_has_no_generic_top_level_modules(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert top == {"hf_prope"}
    assert "hf_prope/patches/llama.py" in names and "hf_prope/recipes/__init__.py" in names


def test_wheel_imports_in_a_fresh_venv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # Dependencies come from this environment's site-packages through a plain path entry: .pth
    # files there (the editable hf_prope) are not processed, so only the wheel provides hf_prope.
    site = subprocess.run(
        [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([py, "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True)
    script = (
        "import importlib.util, hf_prope, hf_prope.patches.gemma, hf_prope.recipes\n"
        f"assert hf_prope.__file__.startswith({str(env_dir)!r}), hf_prope.__file__\n"
        "assert importlib.util.find_spec('patches') is None and importlib.util.find_spec('recipes') is None\n"
        "print(sorted(hf_prope.supported_model_types()))\n"
    )
    result = subprocess.run([py, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "gemma3_text" in result.stdout and "qwen3" in result.stdout
