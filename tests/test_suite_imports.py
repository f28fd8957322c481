"""The test suite's own imports: shared modules are reached as ``tests.<module>``, never through
``conftest`` or a bare sibling name, so that each is loaded once under any of pytest's import
modes (a bare ``conftest`` or ``test_service`` was a second copy of the module beside pytest's)."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def bare_sibling_imports(path: Path, siblings: set[str]) -> list[str]:
    """``file:line module`` for each import of ``conftest`` or of a module of tests/ by its bare name."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        else:
            continue
        for name in names:
            top = name.split(".")[0]
            if top in siblings or name == "tests.conftest":
                found.append(f"{path.name}:{node.lineno} {name}")
    return found


def test_no_test_module_imports_conftest_or_a_sibling_by_its_bare_name() -> None:
    siblings = {p.stem for p in TESTS.glob("*.py")} - {"__init__"}
    assert "conftest" in siblings and "helpers" in siblings
    found = [hit for path in sorted(TESTS.glob("*.py")) for hit in bare_sibling_imports(path, siblings)]
    assert not found, "import these as tests.<module> (helpers: tests.helpers):\n" + "\n".join(found)


def test_the_check_sees_the_forms_it_forbids(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("import conftest\nfrom fakes import serve\nfrom tests.conftest import x\n"
                      "from tests.helpers import make_config\nimport json\n")
    assert bare_sibling_imports(sample, {"conftest", "fakes", "helpers"}) == [
        "sample.py:1 conftest", "sample.py:2 fakes", "sample.py:3 tests.conftest"]
