"""MkDocs hook (mkdocs.yml `hooks:`): the site's home page is README.md itself, so the front door is
written once. Its links into docs/ become links between pages; any other link of the README that
leaves docs/ is left as it is, and `mkdocs build --strict` fails on it."""

from pathlib import Path

README = Path(__file__).resolve().parent.parent / "README.md"


def home_page() -> str:
    return README.read_text(encoding="utf-8").replace("](docs/)", "](index.md)").replace("](docs/", "](")


def on_files(files, config):
    from mkdocs.structure.files import File

    files.append(File.generated(config, "index.md", content=home_page()))
    return files
