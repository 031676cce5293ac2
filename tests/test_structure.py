"""Import rules between the project's folders, read from the source (AST), so that each concern has one home.

- A leading underscore means "used only inside its module": code in pipeline/, cache/, stages/ and bench/ never
  imports such a name from a pipeline/ or cache/ module (`from pipeline.x import _name`), nor reaches it through a
  module it imported (`import pipeline.x as m` ... `m._name`). A helper another module needs gets a public name
  in its home module, so renaming or changing a private one can only break its own module.
- bench/ imports nothing from tests/: a benchmark runs without the test suite (tests/conftest.py imports pytest
  and sets test-only environment on import); what both need lives under bench/ or in the library.
- Layers point one way, stages -> pipeline -> cache, and the loss functions (pipeline/losses/) import only torch and
  each other, so they can be read, tested and reused without the rest of the project.
"""

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

LIBRARY = ("pipeline", "cache")  # whose private names are guarded
CHECKED = ("pipeline", "cache", "stages", "bench")  # whose code is checked


def module_of(path: Path, root: Path) -> str:
    """Dotted module name of a .py file under root (a package's __init__.py is the package)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_module(name: str, root: Path) -> bool:
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or path.is_dir()


def absolute(node: ast.ImportFrom, own: str, is_package: bool) -> str:
    """The absolute module a `from ... import` reads from (relative imports resolved against `own`)."""
    if not node.level:
        return node.module or ""
    base = own.split(".")
    base = base[: len(base) - node.level + (1 if is_package else 0)]
    return ".".join(base + ([node.module] if node.module else []))


def private(name: str) -> bool:
    return name.startswith("_") and not name.endswith("__")  # dunders (__version__, __all__) are not private


def private_uses(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line module._name` for every private name of another pipeline/cache module that `path` uses."""
    own, is_package = module_of(path, root), path.name == "__init__.py"
    tree = ast.parse(path.read_text(), str(path))
    aliases = {}  # local name -> project module it is bound to
    hits = []

    def library(module: str) -> bool:
        return module.split(".")[0] in LIBRARY and module != own  # a module's own names are its own business

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.asname:
                    aliases[a.asname] = a.name
                else:  # `import pipeline.models` binds `pipeline`
                    aliases[a.name.split(".")[0]] = a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            module = absolute(node, own, is_package)
            for a in node.names:
                if is_module(f"{module}.{a.name}", root):  # `from pipeline.losses import kl as m` binds a module
                    aliases[a.asname or a.name] = f"{module}.{a.name}"
                elif library(module) and private(a.name):
                    hits.append(f"{path.relative_to(root)}:{node.lineno} from {module} import {a.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and private(node.attr):
            chain, value = [], node.value
            while isinstance(value, ast.Attribute):
                chain.append(value.attr)
                value = value.value
            if isinstance(value, ast.Name) and value.id in aliases:
                module = ".".join([aliases[value.id], *reversed(chain)])
                if library(module) and is_module(module, root):
                    hits.append(f"{path.relative_to(root)}:{node.lineno} {module}.{node.attr}")
    return hits


def imports_from_tests(path: Path, root: Path = ROOT) -> list[str]:
    """`file:line module` for every import of tests/ (or of a bare `conftest`) in `path`."""
    hits = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and not node.level:
            names = [node.module or ""]
        hits += [
            f"{path.relative_to(root)}:{node.lineno} {n}" for n in names if n.split(".")[0] in ("tests", "conftest")
        ]
    return hits


def imported_modules(path: Path, root: Path = ROOT) -> list[tuple[int, str]]:
    """(line, absolute module) of every import in `path`, relative ones resolved."""
    own, is_package = module_of(path, root), path.name == "__init__.py"
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            out.append((node.lineno, absolute(node, own, is_package)))
    return out


# folder -> the top-level project packages its code may import (besides its own folder and third-party code)
LAYERS = {"cache": set(), "pipeline": {"cache"}, "pipeline/losses": set()}
PROJECT = ("stages", "pipeline", "cache", "bench", "tests")


def layer_violations(folder: str, root: Path = ROOT) -> list[str]:
    """`file:line module` for every import in `folder` of project code outside what LAYERS allows it; for
    pipeline/losses also of any third-party package but torch (the standard library is fine)."""
    import sys

    own = folder.replace("/", ".")
    hits = []
    for path in py_files(folder, root=root):
        for line, module in imported_modules(path, root):
            top = module.split(".")[0]
            if module == own or module.startswith(own + "."):
                continue
            if folder == "pipeline/losses":
                bad = top != "torch" and top not in sys.stdlib_module_names and top != "__future__"
            else:
                bad = top in PROJECT and top != own.split(".")[0] and top not in LAYERS[folder]
            if bad:
                hits.append(f"{path.relative_to(root)}:{line} {module}")
    return hits


def py_files(*folders: str, root: Path = ROOT) -> list[Path]:
    return sorted(p for f in folders for p in (root / f).rglob("*.py"))


def test_no_module_uses_another_modules_private_names():
    files = py_files(*CHECKED)
    assert len(files) > 50
    hits = [h for p in files for h in private_uses(p)]
    assert hits == [], "private names used outside their module (give them a public name):\n" + "\n".join(hits)


def test_bench_imports_nothing_from_tests():
    files = py_files("bench")
    assert files
    hits = [h for p in files for h in imports_from_tests(p)]
    assert hits == [], "bench/ imports from tests/ (move what it needs under bench/):\n" + "\n".join(hits)


@pytest.mark.parametrize("folder", list(LAYERS))
def test_imports_point_down_the_layers(folder):
    assert py_files(folder)
    hits = layer_violations(folder)
    assert hits == [], f"{folder} imports what its layer must not:\n" + "\n".join(hits)


@pytest.mark.parametrize(
    "folder, source, n",
    [
        ("cache", "from pipeline.models import x", 1),
        ("cache", "import stages.common", 1),
        ("cache", "from cache.reader import open_cache\nimport numpy", 0),
        ("pipeline", "from stages.common import app", 1),
        ("pipeline", "from cache.reader import open_cache", 0),
        ("pipeline/losses", "import numpy as np", 1),
        ("pipeline/losses", "from pipeline.models import x", 1),
        ("pipeline/losses", "import math\nimport torch.nn.functional as F\nfrom .kl import LOG_FLOOR", 0),
    ],
)
def test_the_layer_check_can_fail(folder, source, n, tmp_path):
    path = tmp_path / folder / "x.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    assert len(layer_violations(folder, tmp_path)) == n


VIOLATIONS = {
    "from pipeline.models import _x": ["from pipeline.models import _x"],
    "from cache.reader import open_cache, _fields as f": ["from cache.reader import _fields"],
    "from ..models import _x": ["from pipeline.models import _x"],
    "import pipeline.losses.kl as kl\nkl._y": ["pipeline.losses.kl._y"],
    "from pipeline.losses import kl\nkl._y()": ["pipeline.losses.kl._y"],
    "import pipeline.models\npipeline.models._x": ["pipeline.models._x"],
}
ALLOWED = [
    "from pipeline.distill.model import _own",  # the module's own name
    "from pipeline.models import __version__",  # a dunder
    "from pipeline.losses import kl\nkl.__name__",
    "res = f()\nres._replace(a=1)",  # not a module
    "from stages.common import _x",  # the rule guards the library's names (pipeline/, cache/) only
]


@pytest.mark.parametrize("source", list(VIOLATIONS) + ALLOWED)
def test_the_private_name_check_can_fail(source, tmp_path):
    """The checks above on planted code: each violation is reported (at the right module), nothing else is."""
    for f in ("pipeline/models.py", "pipeline/losses/kl.py", "cache/reader.py", "stages/common.py"):
        (tmp_path / f).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / f).touch()
    path = tmp_path / "pipeline/distill/model.py"
    path.parent.mkdir(parents=True)
    path.write_text(source + "\n")
    found = [h.split(" ", 1)[1] for h in private_uses(path, tmp_path)]
    assert found == VIOLATIONS.get(source, [])


@pytest.mark.parametrize(
    "source, n",
    [
        ("from tests.conftest import ROOT", 1),
        ("import tests.memprobe", 1),
        ("import conftest", 1),
        ("from pipeline import models", 0),
        ("from memtools import reset_peak", 0),
    ],
)
def test_the_bench_check_can_fail(source, n, tmp_path):
    path = tmp_path / "bench/x.py"
    path.parent.mkdir()
    path.write_text(source + "\n")
    assert len(imports_from_tests(path, tmp_path)) == n
