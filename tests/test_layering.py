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
