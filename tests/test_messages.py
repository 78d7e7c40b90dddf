"""Messages that say what is wrong (issue 14, "Misleading"), and a workbench that never waits on
donors that failed to open nor offers another donor set's unsaved work."""

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_tui_helpers import notifications, screen_text, settle, sync
from tiny_models import make_donor

from screens.app import SurgeonApp
from screens.dialogs import ConfirmScreen, ErrorScreen
from surgeon.errors import SurgeonError

ROOT = Path(__file__).resolve().parents[1]
SIZE = (100, 32)


def one_line_error(r, *needles):
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


# ---------------------------------------------------------------- session files
@pytest.fixture
def demo_session():
    return json.loads((ROOT / "sessions/demo-transfer.json").read_text())


def test_a_session_without_schema_version_says_the_field_is_missing(demo_session, tmp_path, run_cli):
    del demo_session["schema_version"]
    path = tmp_path / "s.json"
    path.write_text(json.dumps(demo_session))
    line = one_line_error(run_cli("replay", path), str(path), "field schema_version: missing")
    assert "JSON object" not in line


def test_a_malformed_fingerprint_is_named_as_such_not_as_a_changed_donor(demo_session, tmp_path, run_cli):
    demo_session["donors"][1]["fingerprint"] = "sha256:12"  # the schema's form, never a fingerprint's length
    path = tmp_path / "s.json"
    path.write_text(json.dumps(demo_session))
    line = one_line_error(run_cli("replay", path), "field donors/1/fingerprint: malformed", "'sha256:12'")
    assert "changed" not in line


# ---------------------------------------------------------------- the perplexity probe's label
def test_the_ppl_probe_labels_its_score_perplexity(run_cli):
    from surgeon.probes import KINDS, metric_of

    r = run_cli("probe", "demo:base", "--probe", "ppl:arith,limit=4", "--device", "cpu", "--json")
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(r.stdout)["results"]
    assert row["metric"] == "perplexity" and row["score"] > 1  # exp(mean nll), as the label says
    assert metric_of("perplexity") is KINDS["ppl"].metric
    # Results saved while the label said "nll" hold the same numbers and read the same way.
    assert metric_of("nll") is KINDS["ppl"].metric and metric_of("nll").score(1.5) == math.exp(1.5)


# ---------------------------------------------------------------- load_gated's dtype
@pytest.fixture(scope="module")
def bf16_donor(tmp_path_factory):
    import torch

    return make_donor(tmp_path_factory.mktemp("bf16") / "d", "olmoe", seed=0, dtype=torch.bfloat16)


def test_load_gated_honours_a_torch_dtype(bf16_donor):
    import torch

    from surgeon.live.loader import load_gated

    assert next(load_gated(bf16_donor, device="cpu", dtype=torch.float32).parameters()).dtype == torch.float32
    assert next(load_gated(bf16_donor, device="cpu", dtype="float32").parameters()).dtype == torch.float32
    assert next(load_gated(bf16_donor, device="cpu").parameters()).dtype == torch.bfloat16  # keep


@pytest.mark.parametrize("dtype", ["float64", "fp32", "torch.float32", 32, "int8"])
def test_load_gated_refuses_a_dtype_it_would_not_honour(bf16_donor, dtype):
    from surgeon.live.loader import load_gated

    with pytest.raises(SurgeonError, match="expected one of keep, bfloat16, float16, float32 or a torch dtype"):
        load_gated(bf16_donor, device="cpu", dtype=dtype)


def test_load_gated_refuses_an_integer_torch_dtype(bf16_donor):
    import torch

    from surgeon.live.loader import load_gated

    with pytest.raises(SurgeonError, match="floating dtype"):
        load_gated(bf16_donor, device="cpu", dtype=torch.int8)


# ---------------------------------------------------------------- a donor without a tokenizer
def test_routing_on_a_donor_without_tokenizer_files_says_so(donors_of, tmp_path, run_cli):
    bare = tmp_path / "bare"
    shutil.copytree(donors_of("olmoe", 1)[0], bare)
    for p in bare.iterdir():
        if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            p.unlink()
    line = one_line_error(run_cli("routing", bare, "--device", "cpu"), f"{bare} has no tokenizer")
    assert "no tokens" not in line


# ---------------------------------------------------------------- the workbench
def make_app(tmp_path, specs, **kw):
    kw.setdefault("offer_recovery", False)
    return SurgeonApp([str(s) for s in specs], state_dir=tmp_path / "state", **kw)


@pytest.fixture
def bad_config(donors_of, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(donors_of("olmoe", 1)[0], bad)
    config = json.loads((bad / "config.json").read_text())
    config["num_hidden_layers"] = "two"
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@sync
async def test_a_donor_with_a_bad_config_is_an_error_in_the_app_never_a_wait(bad_config, donors_of, tmp_path):
    app = make_app(tmp_path, [bad_config])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.ready and app.wb is None
        text = screen_text(app)
        assert "num_hidden_layers" in text and "opening donors" not in text
    good = donors_of("olmoe", 2)
    app = make_app(tmp_path, [good[0], bad_config, good[1]])
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.ready and sorted(app.wb.donors) == ["A", "B"]  # the others open; the bad one is named
        assert any("num_hidden_layers" in n for n in notifications(app))


@sync
async def test_an_unexpected_error_while_opening_is_shown_not_waited_on(donors_of, tmp_path):
    """Anything a worker raises besides a SurgeonError would end it silently on "opening donors...".
    A spec given as a Path instead of a string opens, then fails in the app's own labelling with
    an AttributeError: a stand-in for any fault nobody turned into a SurgeonError yet."""
    app = SurgeonApp(None, state_dir=tmp_path / "state", offer_recovery=False)
    app.specs = [Path(donors_of("olmoe", 1)[0])]
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.ready and isinstance(app.screen, ErrorScreen)
        assert "AttributeError" in screen_text(app)


def dead_pid() -> int:
    return int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True, check=True).stdout)


def leave_recovery(tmp_path, donor_dirs) -> Path:
    """The recovery file of a workbench on `donor_dirs` that was killed with a mark unsaved."""
    from surgeon.core.donor import open_donor
    from surgeon.core.plan import Assignment, Plan
    from surgeon.core.recovery import RecoveryWriter
    from surgeon.core.session import make_session

    donors = {name: open_donor(d) for name, d in zip("ABC", donor_dirs)}
    session = make_session(Plan("A", [Assignment("router", "B", (0,))]), donors, None)
    writer = RecoveryWriter(tmp_path / "state", pid=dead_pid())
    writer.write(1, session.to_json(), None)
    return writer.path


@sync
async def test_recovery_is_offered_only_for_the_donors_it_belongs_to(donors_of, tmp_path):
    olmoe, qwen = donors_of("olmoe", 3), donors_of("qwen2_moe", 2)
    left = leave_recovery(tmp_path, olmoe)
    # Unrelated donors: no prompt, and the file stays for the start that opens its donors.
    app = make_app(tmp_path, qwen, offer_recovery=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert app.wb is not None and not isinstance(app.screen, ConfirmScreen)
    assert left.is_file()
    # A donor set that shares one donor is not the same work either.
    app = make_app(tmp_path, [olmoe[0], qwen[0]], offer_recovery=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert not isinstance(app.screen, ConfirmScreen)
    # Its own donors: offered, naming them, and restored.
    app = make_app(tmp_path, olmoe, offer_recovery=True)
    async with app.run_test(size=SIZE) as pilot:
        await settle(pilot)
        assert isinstance(app.screen, ConfirmScreen)
        text = screen_text(app)
        assert "did not exit cleanly" in text and "donor0" in text and "donor2" in text
        await pilot.press("y")
        await settle(pilot)
        assert app.dirty and app.wb.plan().assignments[0].donor == "B"
    assert not left.exists()


def test_orphans_filters_by_donor_set(donors_of, tmp_path):
    from surgeon.core.recovery import donor_paths, orphans

    olmoe = donors_of("olmoe", 3)
    left = leave_recovery(tmp_path, olmoe)
    assert donor_paths(left) == {Path(d).resolve() for d in olmoe}
    assert orphans(tmp_path / "state") == [left]  # unfiltered: every orphan, as before
    assert orphans(tmp_path / "state", donors=olmoe[:2]) == [left]  # a part of its set: its work
    assert orphans(tmp_path / "state", donors=[*olmoe, donors_of("qwen2_moe", 1)[0]]) == []
    assert orphans(tmp_path / "state", donors=[]) == []
    (tmp_path / "state" / "recovery-1.json").write_text("{not json")  # pid 1 lives: never an orphan
    bad = tmp_path / "state" / f"recovery-{dead_pid()}.json"
    bad.write_text("{not json")
    assert donor_paths(bad) is None and orphans(tmp_path / "state", donors=olmoe) == [left]


def test_probe_list_and_sweep_help_read_as_written(run_cli):
    out = run_cli("probe", "--list").stdout
    assert "lmevalan" not in out and "  lmeval  an lm-evaluation-harness task" in out
    assert "95%%" not in run_cli("sweep", "--help").stdout and "95% CIs" in run_cli("sweep", "--help").stdout


def test_control_characters_in_a_path_are_shown_escaped_and_usage_mistakes_are_one_line(tmp_path, run_cli):
    """A terminal acts on ANSI sequences it is sent: a hostile file name must be shown, not obeyed."""
    r = run_cli("inspect", tmp_path / "a\x1b[2Jb\x07")
    assert r.returncode == 2 and "\x1b" not in r.stderr and "\x07" not in r.stderr
    assert "a\\x1b[2Jb\\x07" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = run_cli("export", tmp_path / "out", "--no-such-option")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--base" in r.stderr and "see moe-surgeon export --help" in r.stderr


def test_one_translator_turns_any_failure_into_the_line_a_user_sees():
    """The CLI and every screen show failures through io.fs.error_line."""
    import errno

    from surgeon.errors import SurgeonError
    from surgeon.io.fs import error_line

    assert error_line(SurgeonError("a.json: bad\n  field x")) == "a.json: bad field x"
    line = error_line(OSError(errno.ENOSPC, "No space left on device", "/out/model.safetensors"))
    assert line.startswith("/out/model.safetensors: No space left on device (ENOSPC)")
    assert error_line(MemoryError()).startswith("out of memory") and "limit=N" in error_line(MemoryError())
    assert error_line(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB\nmore")).startswith("out of memory: CUDA")
    assert error_line(KeyError("x")) == "KeyError: 'x'"
