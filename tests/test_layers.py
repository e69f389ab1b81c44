"""
The package's layers, checked on the source: what each package may import.

- core and engine speak no HTTP: nothing from twisted.web, transcoder.http or
  transcoder.client;
- the client imports no server package (core, engine, http, service);
- nothing under core, engine or http takes the global reactor: it is given one.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

import transcoder

PACKAGE = Path(transcoder.__file__).parent
SERVER = ("transcoder.core", "transcoder.engine", "transcoder.http", "transcoder.service")
FORBIDDEN = {
    "core": ("twisted.web", "transcoder.http", "transcoder.client"),
    "engine": ("twisted.web", "transcoder.http", "transcoder.client"),
    "client": SERVER,
}
GLOBAL_REACTOR = "twisted.internet.reactor"


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, module) for every module C{path} imports, at any depth (lazy imports too)."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            yield node.lineno, node.module
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def violations(root: Path) -> list[str]:
    """Every import under C{root} (a copy of the package) that breaks a layer's rule."""
    found = []
    for package in ("core", "engine", "http", "client"):
        for path in sorted((root / package).rglob("*.py")):
            where = path.relative_to(root.parent)
            told: set[int] = set()
            for line, name in imports(path):
                if line in told:
                    continue  # one finding per import statement
                if package != "client" and _within(name, GLOBAL_REACTOR):
                    found.append(f"{where}:{line} takes the global reactor")
                    told.add(line)
                elif any(_within(name, prefix) for prefix in FORBIDDEN.get(package, ())):
                    found.append(f"{where}:{line} imports {name} ({package} may not)")
                    told.add(line)
    return found


def test_every_layer_keeps_to_its_imports() -> None:
    """No module of core or engine imports twisted.web, http or client; client imports no server package; nothing under core, engine or http imports the global reactor."""
    assert violations(PACKAGE) == []


@pytest.mark.parametrize(
    ("package", "source", "broken"),
    [
        ("core", "from twisted.web import server\n", "imports twisted.web "),
        ("engine", "import transcoder.http.request\n", "imports transcoder.http.request"),
        (
            "core",
            "def f():\n    from transcoder.client import Client\n",
            "imports transcoder.client",
        ),
        ("client", "from transcoder.core.jobs import Job\n", "imports transcoder.core.jobs"),
        ("client", "from transcoder import service\n", "imports transcoder.service"),
        ("http", "from twisted.internet import reactor\n", "takes the global reactor"),
        ("engine", "import twisted.internet.reactor\n", "takes the global reactor"),
    ],
)
def test_a_broken_rule_is_named(tmp_path: Path, package: str, source: str, broken: str) -> None:
    """The check finds each kind of forbidden import, lazy ones inside functions too, and names the file, the line and the rule."""
    root = tmp_path / "transcoder"
    for name in ("core", "engine", "http", "client"):
        (root / name).mkdir(parents=True)
    (root / package / "bad.py").write_text(source)
    (found,) = violations(root)
    assert found.startswith(f"transcoder/{package}/bad.py:")
    assert broken in found
