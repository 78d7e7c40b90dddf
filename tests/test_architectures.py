"""Architectures are data in one place (surgeon/core/architectures.py): every choice list the command
line and the workbench offer, and every target a feature writes, must come from that table."""

import argparse

import pytest

from screens.mix import ARCHS, FIELDS
from surgeon.cli.main import build_parser
from surgeon.core.architectures import (
    ARCHITECTURES,
    DENSE_TARGETS,
    MIX_OUTPUTS,
    MIX_SOURCES,
)
from surgeon.features.compress import check_source
from surgeon.features.mix.plan import DENSE_TYPES, output_arch
from surgeon.io.dtypes import CASTS, DTYPE_CHOICES


def subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def options(command: str) -> dict[str, argparse.Action]:
    return {s: a for a in subcommands()[command]._actions for s in a.option_strings}


def test_mix_arch_choices_are_the_tables_mix_outputs():
    want = ["auto", *MIX_OUTPUTS]
    assert list(options("mix")["--arch"].choices) == want
    assert list(ARCHS) == want  # the workbench's form
    assert dict((k, hint) for k, _, hint in FIELDS)["arch"] == " · ".join(want)


def test_every_dtype_choice_is_the_tables():
    seen = 0
    for name, p in subcommands().items():
        for a in p._actions:
            if "--dtype" in a.option_strings:
                assert list(a.choices) == DTYPE_CHOICES, name
                seen += 1
    assert seen >= 5  # probe, sweep, routing, export, mix, compress, gates ...
    assert set(options("mix")["--compute-dtype"].choices) == set(CASTS)


def test_compress_help_names_every_dense_target():
    text = subcommands()["compress"].description
    for moe, target in DENSE_TARGETS.items():
        assert f"{moe} -> " in text and target.model_type in text


@pytest.mark.parametrize("moe", list(DENSE_TARGETS))
def test_compress_targets_are_known_architectures(moe):
    assert ARCHITECTURES[moe].moe
    assert DENSE_TARGETS[moe].model_type in ARCHITECTURES  # its anatomy is known: the output opens


@pytest.mark.parametrize("name", list(MIX_OUTPUTS))
def test_mix_outputs_agree_with_their_architecture(name):
    out, arch = MIX_OUTPUTS[name], ARCHITECTURES[name]
    assert arch.moe and out.model_type == name and out.experts_key == arch.experts_key


def test_mix_sources_are_dense_architectures():
    assert DENSE_TYPES == tuple(MIX_SOURCES)
    for dense, source in MIX_SOURCES.items():
        assert not ARCHITECTURES[dense].moe and source.default_output in MIX_OUTPUTS


def test_features_read_the_table(donors_of):
    from surgeon.core.donor import open_donor

    llama = open_donor(donors_of("llama", 1)[0])
    assert output_arch("auto", llama, "A") is MIX_OUTPUTS[MIX_SOURCES["llama"].default_output]
    mixtral = open_donor(donors_of("mixtral", 1)[0])
    assert check_source(mixtral) is DENSE_TARGETS["mixtral"]


def test_docs_list_the_architectures_as_described():
    """docs/families.md's list is generated from the descriptions (scripts/architecture_list.py --write)."""
    from pathlib import Path

    from surgeon.core.architectures import architecture_list_markdown

    page = (Path(__file__).resolve().parent.parent / "docs" / "families.md").read_text()
    start, end = "<!-- architectures:start -->\n", "<!-- architectures:end -->"
    assert page.split(start, 1)[1].split(end, 1)[0] == architecture_list_markdown()
    for a in ARCHITECTURES.values():
        if a.moe:
            assert a.covers, f"{a.model_type} says nothing of what it covers"


def test_nothing_outside_the_descriptions_names_a_model_type():
    """Architectures are data in one place: no other module of the engine or the app spells a
    model_type, so a new family never needs a branch elsewhere."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    names = set(ARCHITECTURES)
    found = []
    for f in sorted([*(root / "surgeon").rglob("*.py"), *(root / "screens").rglob("*.py")]):
        if f.relative_to(root).as_posix() == "surgeon/core/architectures.py":
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value in names:
                found.append(f"{f.relative_to(root)}:{node.lineno} {node.value!r}")
    assert not found, found
