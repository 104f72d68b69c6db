"""A built wheel, installed outside the checkout, has its recipes and example configs.

The wheel is built from a copy of the sources (the checkout gets no build/ or egg-info)
without network (``--no-build-isolation``: setuptools and wheel come from the dev extra),
then installed into a fresh venv that sees this venv's third-party packages through a
``.pth`` path line — a path line only adds the directory, it does not run the editable
install's import hook, so ``import kdlab`` there can only find the wheel.
"""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

import kdlab
from kdlab.recipes import CONFIG_DIR, RECIPE_DIR

REPO = Path(__file__).resolve().parent.parent
SRC_FILES = ["pyproject.toml", "README.md", "LICENSE"]


def _run(cmd, cwd, env=None):
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_wheel_ships_recipes_and_configs_and_runs_outside_the_checkout(tmp_path):
    pytest.importorskip("setuptools", reason="building the wheel offline needs setuptools (the dev extra)")
    recipes = sorted(p.name for p in RECIPE_DIR.glob("*.yaml"))
    configs = sorted(p.name for p in CONFIG_DIR.glob("*.yaml"))
    assert "kim-table2.yaml" in recipes and "teacher-mnist1d.yaml" in configs

    src = tmp_path / "src"
    src.mkdir()
    for name in SRC_FILES:
        if (REPO / name).is_file():
            shutil.copy2(REPO / name, src / name)
    shutil.copytree(Path(kdlab.__file__).parent, src / "kdlab", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    dist = tmp_path / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "--no-index",
          "-w", dist, src], cwd=tmp_path)
    (wheel,) = dist.glob("kdlab-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in recipes:
        assert f"kdlab/assets/recipes/{name}" in names
    for name in configs:
        assert f"kdlab/assets/configs/{name}" in names

    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], cwd=tmp_path)
    python = venv / "bin" / "python"
    # install first: with this venv's packages visible, pip would see the editable kdlab
    _run([sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
         cwd=tmp_path)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], cwd=tmp_path).strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_kdlab_test_deps.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    work = tmp_path / "work"  # outside the source tree: `python -m` puts the cwd on sys.path
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    where = _run([python, "-c", "import kdlab; print(kdlab.__file__)"], cwd=work, env=env).strip()
    assert Path(where).resolve().is_relative_to(venv.resolve()), where

    listing = _run([python, "-m", "kdlab", "reproduce", "--list"], cwd=work, env=env)
    assert "kim-table2" in listing and "muller-mnist" in listing
    assert len(listing.splitlines()) == len(recipes)
    unknown = subprocess.run([python, "-m", "kdlab", "reproduce", "no-such-recipe"], cwd=work, env=env,
                             capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 2 and "known: kd-translation, kim-ensemble, kim-fig3" in unknown.stderr
    assert "teacher-mnist1d" in _run([venv / "bin" / "kdlab", "configs"], cwd=work, env=env)

    out = tmp_path / "runs"
    _run([python, "-m", "kdlab", "train", "teacher-mnist1d", "data.name=digits", "model.name=mlp-16",
          "optim.epochs=1", f"out_dir={out}", "--no-progress"], cwd=work, env=env)
    (result,) = out.glob("teacher-*/result.json")
    assert result.is_file()
