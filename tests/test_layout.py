"""The layout's habits, held by the suite: the linter's configuration passes, docstrings name things
that exist, and the top level stays the commands and the design card's names."""
import ast
import glob
import importlib
import os
import re
import subprocess
import sys

from conftest import REPO

PACKAGES = ("core", "engine", "inputs", "fastload")
# Names a reference like `model.pt` or `checkpoint_best.pth` ends with when it means a file, not an attribute.
FILE_SUFFIXES = {"py", "pt", "pth", "json", "onnx", "png", "jpg", "jpeg", "jpegs", "u8", "lock", "yaml", "csv",
                 "txt", "tmp", "md", "sh", "bmp", "tif", "tiff", "ppm", "pgm", "webp", "gif"}


def project_modules():
    """{short name: dotted name} of every module of the project (top level and packages)."""
    modules = {}
    for path in glob.glob(os.path.join(REPO, "*.py")) + glob.glob(os.path.join(REPO, "*", "*.py")):
        relative = os.path.relpath(path, REPO)[:-3]
        if relative.split(os.sep)[0] in ("tests", "bench") or relative.endswith("__init__"):
            continue
        modules[os.path.basename(relative)] = relative.replace(os.sep, ".")
    return modules


def docstrings(path):
    tree = ast.parse(open(path).read())
    nodes = [tree] + [node for node in ast.walk(tree)
                      if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))]
    return [text for text in map(ast.get_docstring, nodes) if text]


def test_ruff_passes_under_the_projects_configuration():
    result = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", REPO], capture_output=True,
                            text=True, cwd=REPO)
    assert result.returncode == 0, result.stdout + result.stderr


def test_module_references_in_docstrings_resolve():
    """`module.name` and `module.py` in a docstring name a module of the project and something it
    defines, so a rename or a move cannot leave a stale pointer behind."""
    modules = project_modules()
    stale = []
    for short, dotted in sorted(modules.items()):
        path = os.path.join(REPO, *dotted.split(".")) + ".py"
        for text in docstrings(path):
            for module, name in re.findall(r"(?<![\w./-])([a-z_]+)\.([A-Za-z_]\w*)", text):
                if module not in modules or (name in FILE_SUFFIXES and name != "py"):
                    continue
                if name == "py":
                    continue  # the module exists: it is in `modules`
                owner = importlib.import_module(modules[module])
                if not hasattr(owner, name):
                    stale.append(f"{dotted}: {module}.{name}")
    assert not stale, "docstrings name things that do not exist: " + ", ".join(stale)


def test_the_top_level_holds_the_commands_and_the_design_cards_names():
    top = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(REPO, "*.py")))
    assert {"launch_ddp", "train_ddp", "model", "dataset", "utils"} <= set(top)
    assert len(top) <= 15, top
    for package in PACKAGES:
        assert os.path.isfile(os.path.join(REPO, package, "__init__.py")), package
