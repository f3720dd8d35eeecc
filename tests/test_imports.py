"""The import graph: arrows in one direction. No cycle among the project's modules (imports inside
functions count: a deferred import still ties two modules together), the model loads without the
training machinery, and the commands share the shell (core.cli) rather than importing each other."""
import ast
import glob
import os
import subprocess
import sys

from conftest import REPO

PACKAGES = ("core", "engine", "inputs", "fastload")


def project_modules():
    """{dotted name: path} of the project's modules: the top level and the packages, not the
    tests, the benchmarks or the packages' empty __init__ files."""
    paths = glob.glob(os.path.join(REPO, "*.py"))
    for package in PACKAGES:
        paths += [path for path in glob.glob(os.path.join(REPO, package, "*.py"))
                  if not path.endswith("__init__.py")]
    return {os.path.relpath(path, REPO)[:-3].replace(os.sep, "."): path for path in paths}


def imported_names(tree):
    """Every module name an `import` or `from ... import` anywhere in the tree may refer to: for
    `from engine import distributed`, both `engine` and `engine.distributed`."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.module
            yield from (f"{node.module}.{alias.name}" for alias in node.names)


def import_graph():
    """{module: set of project modules it imports}."""
    modules = project_modules()
    graph = {}
    for name, path in modules.items():
        with open(path) as f:
            tree = ast.parse(f.read(), path)
        graph[name] = {imported for imported in imported_names(tree) if imported in modules and imported != name}
    return graph


def find_cycle(graph):
    """One cycle as a list of modules (the first repeated at the end), or None."""
    state = {}  # module: "open" while on the current path, "done" once all it reaches is explored

    def visit(module, path):
        path = path + [module]
        state[module] = "open"
        for target in sorted(graph[module]):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state:
                cycle = visit(target, path)
                if cycle:
                    return cycle
        state[module] = "done"
        return None

    for module in sorted(graph):
        if module not in state:
            cycle = visit(module, [])
            if cycle:
                return cycle
    return None


def test_the_graph_sees_the_projects_imports():
    graph = import_graph()
    assert {"core.files", "core.cli", "model", "engine.checkpoint", "fastload.cache_file"} <= set(graph)
    assert "core.files" in graph["engine.checkpoint"] and "engine.distributed" in graph["fastload.cache_file"]


def test_the_import_graph_has_no_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_a_deferred_import_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_commands_do_not_import_each_other_and_files_import_nothing_of_the_project():
    graph = import_graph()
    assert "predict" not in graph["export"]
    assert graph["core.files"] == set()
    assert graph["core.cli"] == {"core.errors"} and graph["core.errors"] == set()
    for cache_module in ("fastload.cache_file", "fastload.cache_jpeg"):
        assert "engine.checkpoint" not in graph[cache_module]
    assert "fastload.cache_jpeg" not in graph["fastload.cache_file"]


def test_importing_the_model_loads_no_checkpoint_recipe_augmentation_or_history_module():
    """Module wrappers (unwrap, strip_wrapper_prefixes) live with the model, first_line with the
    errors: `import model` stays light and free of the training story."""
    unwanted = ["engine.checkpoint", "engine.recipe", "engine.resume", "inputs.augment", "utils"]
    code = f"import sys, model; print([name for name in {unwanted!r} if name in sys.modules])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_the_file_helpers_and_the_command_shell_load_without_torch():
    code = "import sys, core.files, core.cli, config; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"
