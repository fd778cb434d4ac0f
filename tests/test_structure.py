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


def _imports(path: Path) -> list[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved against the package)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = None
    if path.is_relative_to(PACKAGE):
        package = ".".join(("saesteer", *path.relative_to(PACKAGE).with_suffix("").parts))
        if path.name != "__init__.py":
            package = package.rsplit(".", 1)[0]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level and package:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
            else:
                module = node.module or ""
            out.append(module)
            out += [f"{module}.{a.name}" for a in node.names]
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
