"""The engine never imports the UI, and the fast commands never import the heavy libraries."""

import subprocess
import sys


def test_engine_never_imports_textual():
    r = subprocess.run(["lint-imports"], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "KEPT" in r.stdout


def test_inspect_export_replay_import_no_torch_transformers_or_textual():
    code = (
        "import sys; import surgeon.cli.main, surgeon.features.export, surgeon.core.session, surgeon.core.resolve, surgeon.core.donor;"
        "heavy = [m for m in ('torch', 'transformers', 'textual', 'safetensors') if m in sys.modules];"
        "print(heavy); sys.exit(1 if heavy else 0)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
