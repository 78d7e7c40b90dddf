"""The documentation: the README is a front door, the pages under docs/ build into a site with no
broken link or anchor, the architecture page names only modules that exist, and no page, help text
or comment calls a published work by the number of a file nobody outside the project has."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"


def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (strict is also in mkdocs.yml): a link to a page or an anchor that does
    not exist, or a page missing from the nav, fails the build."""
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    r = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(ROOT / "mkdocs.yml"),
                        "-d", str(tmp_path / "site")], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    home = (tmp_path / "site" / "index.html").read_text()
    assert "A first session" in home and 'href="probes/"' in home  # the README, its docs/ links made relative


def test_readme_is_a_front_door():
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 300
    # Its second command is the whole test suite, and CI runs exactly that.
    block = readme.split("```bash\n", 1)[1].split("```", 1)[0].splitlines()
    test_command = block[1].split("#", 1)[0].strip()
    assert test_command == "python -m pytest"
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
    # Every command has a row in its table, with a link to its page.
    from surgeon.cli.main import COMMANDS

    rows = [line for line in readme.splitlines() if line.startswith("| `moe-surgeon")]
    for command in COMMANDS:
        assert any(line.startswith(f"| `moe-surgeon {command}") and "](docs/" in line for line in rows), command


def architecture_paths_missing(text: str) -> list[str]:
    """The file and directory names `text` mentions that exist nowhere in the tree. A name with a
    slash is looked up from the root, screens/, surgeon/ and each of its layers (`sweep/` is
    surgeon/features/sweep/); a bare file name (`types.py`) anywhere under surgeon/, screens/, tests/
    or docs/."""
    bases = [ROOT, ROOT / "screens", DOCS, ROOT / "surgeon", *sorted((ROOT / "surgeon").glob("*/"))]
    missing = []
    for name in sorted(set(re.findall(r"(?<![\w./-])((?:[\w-]+/)+(?:[\w-]+\.\w+)?|[\w-]+\.(?:py|tcss|toml|json|md))"
                                      r"(?![\w/-])", text))):
        if "/" in name:
            found = any((base / name).exists() for base in bases)
        else:
            found = any(next(base.rglob(name), None) for base in (ROOT / "surgeon", ROOT / "screens", ROOT / "tests",
                                                                  DOCS)) or (ROOT / name).exists()
        if not found:
            missing.append(name)
    return missing


def test_architecture_page_names_only_modules_that_exist():
    text = (DOCS / "ARCHITECTURE.md").read_text()
    assert architecture_paths_missing(text) == []
    # The check sees the names it must see.
    assert architecture_paths_missing("`surgeon/live/keeper.py`, `cli/main.py`, `types.py`, `surgeon/io/`") == []
    assert architecture_paths_missing("`surgeon/gates_file.py`, `mix_build.py`, `surgeon/sweep/`") == [
        "mix_build.py", "surgeon/gates_file.py", "surgeon/sweep/"]


def test_no_seed_numbers_where_a_user_reads():
    """"seed 003" is a file of the project's own notes: the README, the docs, help texts, the app and
    the comments name the work (docs/references.md)."""
    seed = re.compile(r"\bseeds? 0\d\d\b", re.IGNORECASE)
    files = [ROOT / "README.md", *DOCS.rglob("*.md")]
    for package in ("surgeon", "screens", "scripts", "bench"):
        files += [*(ROOT / package).rglob("*.py"), *(ROOT / package).rglob("*.tcss")]
    found = [f"{f.relative_to(ROOT)}:{i}" for f in files
             for i, line in enumerate(f.read_text(encoding="utf-8").splitlines(), 1) if seed.search(line)]
    assert found == []
