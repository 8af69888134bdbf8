"""One name in site-packages: the repo's folders install as subpackages of `safekeel`.

pytest runs from the repo root, so a bare `import data` would still resolve to our folder
here; these tests look from outside: the built wheel's top level, the installed CLI run
from another folder with foreign `evaluate` and `data` packages first on the path, and the
source's own imports.
"""

import ast
import os
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STAGE_FOLDERS = ("annotate", "train", "evaluate", "data")
BARE_NAMES = {*STAGE_FOLDERS, "pipeline", "recipe", "console"}


def project_sources() -> list[Path]:
    files = sorted(REPO.glob("*.py"))  # pipeline, recipe, console, __init__, __main__
    for folder in (*STAGE_FOLDERS, "tests", "benchmarks"):
        files += sorted((REPO / folder).rglob("*.py"))
    return files


def test_no_module_imports_a_stage_by_its_bare_folder_name():
    bare = []
    for path in project_sources():
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            bare += [f"{path.relative_to(REPO)}:{node.lineno} {name}"
                     for name in names if name.split(".")[0] in BARE_NAMES]
    assert not bare, "import through `safekeel.`: " + ", ".join(bare)


def test_every_package_folder_is_listed_for_the_wheel():
    """setuptools installs only the packages pyproject names: a new subpackage left out of
    the list is missing from the wheel (data.guard and data.shards once were)."""
    listed = set(tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
                 ["packages"])
    folders = {".".join(("safekeel", *init.parent.relative_to(REPO).parts))
               for folder in STAGE_FOLDERS for init in (REPO / folder).rglob("__init__.py")}
    assert folders | {"safekeel"} == listed


def test_console_script_points_at_the_namespaced_pipeline():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert project["name"] == "safekeel"
    assert project["scripts"]["safekeel"] == "safekeel.pipeline:main"
    assert set(project["optional-dependencies"]) >= {"cpu", "gpu", "peft", "dev"}


@pytest.mark.slow
def test_wheel_has_safekeel_as_its_only_top_level_name(built_wheel):
    wheel = built_wheel
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/")[0] for name in names if ".dist-info/" not in name}
    assert top_level == {"safekeel"}
    for module in ("__init__.py", "__main__.py", "pipeline.py", "recipe.py", "console.py",
                   "annotate/run.py", "train/run.py", "evaluate/run.py", "data/corpus.py",
                   "data/embedded/world.py", "configs/embedded.yaml"):
        assert f"safekeel/{module}" in names
    assert not any(name.startswith("safekeel/tests/") for name in names)


@pytest.fixture
def foreign_packages(tmp_path) -> Path:
    """Packages named like our folders, as another distribution (HF `evaluate`) installs them."""
    root = tmp_path / "foreign"
    for name in ("evaluate", "data", "train", "annotate"):
        (root / name).mkdir(parents=True)
        (root / name / "__init__.py").write_text(
            f"raise ImportError('the foreign {name} package was imported')\n")
    (root / "pipeline.py").write_text("raise ImportError('the foreign pipeline was imported')\n")
    return root


def run_beside(foreign: Path, *command: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(foreign)}
    return subprocess.run(command, cwd=foreign.parent, env=env, capture_output=True,
                          text=True, check=False)


@pytest.mark.slow
def test_cli_runs_beside_foreign_evaluate_and_data(foreign_packages):
    script = Path(sys.executable).parent / "safekeel"
    if not script.exists():
        pytest.skip("safekeel is not installed in this environment (pip install -e .)")
    for command in ([str(script), "evaluate", "--help"],
                    [sys.executable, "-m", "safekeel", "annotate", "--help"],
                    [sys.executable, "-m", "safekeel.pipeline", "train", "--help"]):
        done = run_beside(foreign_packages, *command)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "--" in done.stdout and "foreign" not in done.stderr


@pytest.mark.slow
def test_every_module_imports_beside_foreign_packages(foreign_packages):
    modules = sorted(
        "safekeel." + ".".join(path.relative_to(REPO).with_suffix("").parts)
        for folder in STAGE_FOLDERS for path in (REPO / folder).rglob("*.py")
        if path.name != "__init__.py")
    code = ("import importlib\n"
            f"for name in {modules!r}: importlib.import_module(name)\n"
            "print('ours imported')\n"
            "import evaluate\n")  # the foreign one is still what a bare name finds
    done = run_beside(foreign_packages, sys.executable, "-c", code)
    assert done.stdout.strip() == "ours imported", done.stderr[-3000:]
    assert "the foreign evaluate package was imported" in done.stderr
