"""The layout rules of ARCHITECTURE.md, checked on the source text: production code never reaches into
``tests/``, streamlit stays in ``ui/``, the app picks its sources in one place, pages follow ``nav.PAGES``."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from saesteer.ui.nav import PAGES

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "saesteer"
PRODUCTION = [*sorted(PACKAGE.rglob("*.py")), ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")),
              *sorted((ROOT / "benchmarks").glob("*.py")), *sorted((ROOT / "scripts").glob("*.py"))]


def _package_of(path: Path) -> str | None:
    """The package a relative import in ``path`` starts from (None outside ``src/saesteer``)."""
    if not path.is_relative_to(PACKAGE):
        return None
    package = ".".join(("saesteer", *path.relative_to(PACKAGE).with_suffix("").parts))
    return package if path.name == "__init__.py" else package.rsplit(".", 1)[0]


def _from_module(node: ast.ImportFrom, package: str | None) -> str:
    """The absolute name of the module a ``from ... import`` reads."""
    if node.level and package:
        base = package.split(".")[: len(package.split(".")) - node.level + 1]
        return ".".join([*base, node.module] if node.module else base)
    return node.module or ""


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            out.append(module)
            out += [f"{module}.{a.name}" for a in node.names]
    return out


def _is_module(name: str) -> bool:
    """Whether ``name`` (e.g. ``saesteer.ui.loaders``) is a module or package of saesteer."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _private_uses(path: Path) -> list[str]:
    """``module._name`` for each underscore-private name of another saesteer module that ``path`` imports
    (``from m import _name``) or reads off an imported module (``m._name``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = _package_of(path)
    modules: dict[str, str] = {}  # local name -> saesteer module it is bound to
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            module = _from_module(node, package)
            if module.split(".")[0] != "saesteer":
                continue
            for a in node.names:
                if _private(a.name):
                    out.append(f"{module}.{a.name}")
                elif _is_module(f"{module}.{a.name}"):
                    modules[a.asname or a.name] = f"{module}.{a.name}"
        elif isinstance(node, ast.Import):
            for a in node.names:
                if a.name.split(".")[0] == "saesteer":
                    modules[a.asname or a.name.split(".")[0]] = a.name if a.asname else "saesteer"
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr) and isinstance(node.value, ast.Name) and node.value.id in modules:
            out.append(f"{modules[node.value.id]}.{node.attr}")
    return out


def test_no_production_code_reaches_into_tests():
    offenders = []
    for path in PRODUCTION:
        text = path.read_text(encoding="utf-8")
        names = _imports(path)
        if any(n == "conftest" or n.startswith(("conftest.", "tests.", "test_")) for n in names):
            offenders.append(f"{path.relative_to(ROOT)}: imports test code")
        if re.search(r"""["']tests["']|/ ?["']tests""", text):
            offenders.append(f"{path.relative_to(ROOT)}: names the tests/ folder")
    assert not offenders, offenders


def test_streamlit_is_imported_only_under_ui():
    outside = [p for p in PACKAGE.rglob("*.py") if not p.is_relative_to(PACKAGE / "ui") and any(n.split(".")[0] == "streamlit" for n in _imports(p))]
    assert not outside, outside


def test_the_app_chooses_its_sources_in_one_place():
    """Only ``paths`` (which names the variable) and ``ui/sources.py`` (which reads it) know the fixture mode."""
    users = sorted(str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py") if re.search(r"fixture_mode|FIXTURE_ENV", p.read_text(encoding="utf-8")))
    assert users == ["paths.py", "ui/sources.py"]


def test_the_sources_share_one_interface():
    from saesteer.ui.sources import RealSources, Sources, TinySources

    wanted = {n for n in dir(Sources) if not n.startswith("_")} | set(Sources.__annotations__)
    for impl in (RealSources(), TinySources()):
        missing = [n for n in wanted if not hasattr(impl, n)]
        assert not missing, f"{type(impl).__name__} lacks {missing}"


@pytest.mark.parametrize("key", list(PAGES))
def test_every_page_is_a_module_named_after_its_key(key):
    module = importlib.import_module(f"saesteer.ui.pages.{key}")
    assert callable(module.render)
    shim = ROOT / PAGES[key].path
    assert f"from saesteer.ui.pages import {key}\n" in shim.read_text(encoding="utf-8"), f"{shim.name} does not render ui.pages.{key}"


def test_page_modules_are_exactly_the_nav_keys():
    modules = {p.stem for p in (PACKAGE / "ui" / "pages").glob("*.py") if p.stem != "__init__"}
    assert modules == set(PAGES)
    shims = {str(p.relative_to(ROOT)) for p in (ROOT / "pages").glob("*.py")} | {"app.py"}
    assert shims == {info.path for info in PAGES.values()}


def test_page_url_paths_follow_the_file_names():
    assert PAGES["home"].url_path == ""
    assert PAGES["card"].url_path == "Feature_card"
    assert PAGES["features"].url_path == "Features_side_by_side"


def test_no_page_imports_another_page():
    """Pages share code through helper modules in ``ui/`` (e.g. ``ui/live.py``, ``ui/session.py``), never by
    importing each other."""
    offenders = []
    for path in sorted((PACKAGE / "ui" / "pages").glob("*.py")):
        others = {f"saesteer.ui.pages.{key}" for key in PAGES if key != path.stem}
        reached = sorted({n for n in _imports(path) if n in others or n.rsplit(".", 1)[0] in others})
        if reached:
            offenders.append(f"ui/pages/{path.name} imports {reached}")
    assert not offenders, offenders


#: Known uses still to be removed, each by the change that owns its file (an entry that is gone fails the test,
#: so the list only shrinks). ui/pages/evaluation.py: the evaluation page's rewrite gives it a public name (issue 13).
PENDING_PRIVATE_USES: set[str] = set()


def test_no_module_uses_another_modules_private_names():
    """An underscore name is private to its module: nothing in the package imports it or reads it off an
    imported module (a helper two modules need gets a public name in the module that owns it)."""
    found = {f"{p.relative_to(PACKAGE)}: {use}" for p in sorted(PACKAGE.rglob("*.py")) for use in _private_uses(p)}
    assert not found - PENDING_PRIVATE_USES, sorted(found - PENDING_PRIVATE_USES)
    gone = PENDING_PRIVATE_USES - found
    assert not gone, f"{sorted(gone)} no longer happen: remove them from PENDING_PRIVATE_USES"


def test_only_steering_registers_forward_hooks():
    """``steering.py`` is the one place that edits the residual stream: no other production file installs a
    forward hook (or pre-hook) on a module, directly or through torch's global hook registries."""
    hook = re.compile(r"\bregister_(?:module_)?forward_(?:pre_)?hook\b")
    outside = [f"{p.relative_to(ROOT)}:{i}" for p in PRODUCTION if p != PACKAGE / "steering.py"
               for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if hook.search(line)]
    assert not outside, outside
    assert hook.search((PACKAGE / "steering.py").read_text(encoding="utf-8"))  # the check looks for what steering uses
