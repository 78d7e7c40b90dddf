"""surgeon/io/versions.py: the versions our records name, read from the metadata files on sys.path,
must be what `importlib.metadata.version` says for the same names."""

import sys
from importlib import metadata

import pytest

from surgeon.io.versions import installed_versions


def _reference(names):
    out = {}
    for name in names:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def test_the_libraries_a_manifest_names_match_importlib_metadata():
    names = ["moe-surgeon", "safetensors", "torch", "transformers", "xxhash", "numpy", "textual"]
    found = installed_versions(names)
    assert found == _reference(names)
    assert set(found) == set(names)  # all installed here: the test's own requirements


def _dist(folder, dir_name, file_name, text):
    d = folder / dir_name
    d.mkdir(parents=True)
    (d / file_name).write_text(text)


@pytest.fixture
def fake_path(tmp_path, monkeypatch):
    first, second = tmp_path / "first", tmp_path / "second"
    # a wheel's dist-info, its name escaped; an egg-info with no version in its name; a distribution
    # in two sys.path entries (the first wins); one whose metadata has no Version header
    _dist(first, "Foo_Bar-1.2.3.dist-info", "METADATA", "Metadata-Version: 2.1\nName: Foo-Bar\nVersion: 1.2.3\n\nbody\n")
    _dist(first, "baz.egg-info", "PKG-INFO", "Metadata-Version: 1.0\nName: baz\nversion: 0.9\n")
    _dist(first, "twice-2.0.dist-info", "METADATA", "Name: twice\nVersion: 2.0\n")
    _dist(second, "twice-1.0.dist-info", "METADATA", "Name: twice\nVersion: 1.0\n")
    _dist(first, "noversion-1.0.dist-info", "METADATA", "Name: noversion\n\nVersion: 3.0 (in the body)\n")
    monkeypatch.setattr(sys, "path", [str(first), str(tmp_path / "gone"), str(second)])
    return tmp_path


def test_names_are_matched_normalised_and_the_first_on_sys_path_wins(fake_path):
    names = ["foo-bar", "Foo.Bar", "BAZ", "twice", "absent"]
    found = installed_versions(names)
    assert found == {"foo-bar": "1.2.3", "Foo.Bar": "1.2.3", "BAZ": "0.9", "twice": "2.0"}
    assert found == _reference(names)


def test_a_metadata_file_without_a_version_header_is_asked_of_importlib_metadata(fake_path):
    # The scan reads headers only (they end at the first empty line). importlib.metadata finds the
    # same file and no version in it either: the name is left out, not given a version from a later
    # sys.path entry or from the body.
    _dist(fake_path / "second", "noversion-1.0.dist-info", "METADATA", "Name: noversion\nVersion: 1.0\n")
    assert metadata.version("noversion") is None
    assert installed_versions(["noversion"]) == {}


def test_entries_that_are_not_directories_are_passed_over(fake_path, monkeypatch):
    # a bytes entry (importlib.metadata itself fails on one) and a file (a zip, say) before the
    # directory that holds the distribution
    a_file = fake_path / "archive.zip"
    a_file.write_bytes(b"PK")
    monkeypatch.setattr(sys, "path", [b"/nowhere", str(a_file), str(fake_path / "first")])
    assert installed_versions(["foo-bar"]) == {"foo-bar": "1.2.3"}
