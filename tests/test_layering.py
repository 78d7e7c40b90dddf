"""The engine never imports the UI, its layers only import downwards, and the fast commands never
import the heavy libraries."""

import subprocess
import sys
from pathlib import Path

try:
    import tomllib
except ImportError:  # Python 3.10: pytest itself depends on tomli there
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent


def test_every_import_contract_is_kept():
    contracts = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    # The three the layout rests on; a contract quietly dropped from pyproject fails here too.
    assert {c["type"] for c in contracts} >= {"forbidden", "layers", "acyclic_siblings"}
    # import-linter puts its working directory on sys.path: this checkout's packages, not an install.
    r = subprocess.run(["lint-imports"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr
    # "NAME KEPT" or "NAME KEPT (1 ignored import)"
    kept = {line.rsplit(" KEPT", 1)[0] for line in r.stdout.splitlines() if " KEPT" in line}
    for c in contracts:
        assert c["name"] in kept, (c["name"], r.stdout)


def test_inspect_export_replay_import_no_torch_transformers_or_textual():
    code = (
        "import sys; import surgeon.cli.main, surgeon.features.export, surgeon.core.session, surgeon.core.resolve, surgeon.core.donor;"
        "heavy = [m for m in ('torch', 'transformers', 'textual', 'safetensors') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stdout + r.stderr


def test_no_module_imports_back_from_its_own_package():
    """`from . import X` (or `from surgeon.pkg import X`) inside surgeon/pkg/, for an X that is not a
    submodule, imports the package's __init__, which imports that module: a cycle import-linter's
    sibling contract cannot see. The package's __init__ only re-exports; its modules import each
    other by name."""
    import ast

    found = []
    for path in sorted((ROOT / "surgeon").rglob("*.py")):
        if path.name == "__init__.py":
            continue
        package = path.parent
        dotted = ".".join(package.relative_to(ROOT).parts)
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.ImportFrom):
                continue
            own = (node.level == 1 and not node.module) or (node.level == 0 and node.module == dotted)
            if own:
                for alias in node.names:
                    if not (package / f"{alias.name}.py").exists() and not (package / alias.name).is_dir():
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {alias.name} from its package")
    assert not found, "\n".join(found)
