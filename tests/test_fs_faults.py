"""Filesystem faults end as one line and exit 2, never a traceback or partial output; a killed
export's leftovers are removed (and reported) by the next export into the same parent.

Tests run as root here, where permission bits stop nothing: faults come from what really fails
for root too (a regular file in the path, a read-only or tiny tmpfs mounted in a user namespace,
RLIMIT_FSIZE), and permission tests drop the capabilities that let root ignore permission bits.
"""

from __future__ import annotations

import os
import random
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from surgeon.errors import SurgeonError
from surgeon.io.fs import check_free_space

REPO = Path(__file__).resolve().parent.parent
CLI = [sys.executable, "-m", "surgeon.cli"]


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("moe-surgeon: error:")]
    assert "Traceback" not in stderr, stderr
    assert len(lines) == 1, stderr
    return lines[0]


def visible(parent: Path) -> list[str]:
    return sorted(os.listdir(parent))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------- paths that cannot be written
def test_export_under_a_regular_file_is_one_line(donors_of, tmp_path, run_cli):
    a, _ = donors_of("olmoe", 2)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    for out in (blocker / "out", blocker / "nested" / "deeper" / "out"):
        r = run_cli("export", out, "--base", a)
        assert r.returncode == 2
        line = one_line_error(r.stderr)
        assert str(blocker) in line and "not a directory" in line
    assert visible(tmp_path) == ["file"]


def test_an_unwritable_session_path_fails_before_the_export_is_written(donors_of, tmp_path, run_cli):
    a, _ = donors_of("olmoe", 2)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    r = run_cli("export", tmp_path / "out", "--base", a, "--save-session", blocker / "s.json")
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "s.json" in line and "save the session" in line
    assert visible(tmp_path) == ["file"]  # no export, no staging directory


def test_the_cli_turns_an_escaping_oserror_into_one_line(tmp_path, run_cli, monkeypatch):
    # An I/O error (EIO: a failing disk) is no user mistake the engine names; the CLI's last resort
    # still prints it as one line with the file, exit 2. The disk cannot be made to fail here, so
    # the session writer raises what a failing disk would.
    import errno

    from surgeon.core import session as session_module

    target = tmp_path / "s.json"

    def failing_disk(path, data, **kw):
        raise OSError(errno.EIO, os.strerror(errno.EIO), str(path))

    monkeypatch.setattr(session_module, "write_atomic", failing_disk)
    r = run_cli("export", tmp_path / "out", "--base", "demo:base", "--save-session", target)
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert str(target) in line and "EIO" in line


def test_free_space_is_checked_before_anything_is_written(tmp_path):
    free = shutil.disk_usage(tmp_path).free
    with pytest.raises(SurgeonError) as e:
        check_free_space(tmp_path / "a" / "b" / "out", free + 10**12)
    msg = str(e.value)
    assert str(free + 10**12) in msg and str(tmp_path) in msg and "\n" not in msg
    check_free_space(tmp_path / "out", 1)  # fits: no error
    assert visible(tmp_path) == []


# ---------------------------------------------------------------- real faults in a private mount
def _can_mount() -> bool:
    if not shutil.which("unshare"):
        return False
    r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"],
                       capture_output=True)
    return r.returncode == 0


needs_mount = pytest.mark.skipif(not _can_mount(), reason="no user namespaces with mount here")


def export_in_tmpfs(tmp_path: Path, options: str, export_args: str) -> subprocess.CompletedProcess:
    """`moe-surgeon export M/out ...` with a fresh tmpfs mounted (with `options`) at M, in a private
    mount namespace; prints what M holds afterwards on stdout's last line."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cli = " ".join(map(shlex.quote, CLI))
    script = (f"mount -t tmpfs -o {options} tmpfs {mnt} || exit 99; "
              f"{cli} export {mnt}/out {export_args}; rc=$?; echo; echo LEFT: $(ls -A {mnt}); exit $rc")
    r = subprocess.run(["unshare", "-rm", "sh", "-c", script], capture_output=True, text=True,
                       cwd=REPO, timeout=300)
    assert r.returncode != 99, r.stderr
    return r


@needs_mount
def test_read_only_filesystem_is_one_line(donors_of, tmp_path):
    a, _ = donors_of("olmoe", 2)
    r = export_in_tmpfs(tmp_path, "ro,size=1m", f"--base {a}")
    assert r.returncode == 2
    assert "EROFS" in one_line_error(r.stderr)
    assert r.stdout.splitlines()[-1] == "LEFT:"


@needs_mount
def test_too_little_free_space_is_refused_early_with_both_numbers(donors_of, tmp_path):
    a, _ = donors_of("olmoe", 2)
    r = export_in_tmpfs(tmp_path, "size=16k", f"--base {a}")
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "needs" in line and "free" in line and "16384 bytes" in line
    assert r.stdout.splitlines()[-1] == "LEFT:"


@needs_mount
def test_disk_full_midway_is_one_line_and_leaves_nothing(donors_of, tmp_path):
    # Space is plenty, inodes run out: the free-space check passes and the third file fails ENOSPC.
    a, _ = donors_of("olmoe", 2)
    r = export_in_tmpfs(tmp_path, "size=8m,nr_inodes=4", f"--base {a} --max-shard-size 40KB")
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "ENOSPC" in line and str(tmp_path / "mnt" / "out") in line
    assert r.stdout.splitlines()[-1] == "LEFT:"


def test_file_size_limit_is_one_line_and_leaves_nothing(donors_of, tmp_path):
    a, _ = donors_of("olmoe", 2)  # its one shard is ~100 KB

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails EFBIG instead of killing
        resource.setrlimit(resource.RLIMIT_FSIZE, (50_000, 50_000))

    out = tmp_path / "parent" / "out"
    r = subprocess.run([*CLI, "export", str(out), "--base", a], capture_output=True, text=True, cwd=REPO,
                       preexec_fn=limit, timeout=300)
    assert r.returncode == 2
    line = one_line_error(r.stderr)
    assert "EFBIG" in line and "--max-shard-size" in line and str(out) in line
    assert visible(out.parent) == []


WRITE_PAST_A_LIMIT = """
import os, resource, signal, sys
from surgeon.io.fs import write_all
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT, 0o644)
print("one write:", os.write(fd, b"x" * 3000))  # the kernel writes up to the limit and says how much
os.lseek(fd, 0, 0)
try:
    write_all(fd, b"y" * 3000)
    print("write_all: no error")
except OSError as e:
    print("write_all:", e.errno)
"""


def test_a_short_write_is_never_taken_for_the_whole(tmp_path):
    """One os.write may write less than it was given (a file-size limit, or 2 GiB on Linux):
    write_all goes on, so the rest either lands or fails aloud, never leaving a file silently short."""
    import errno

    r = subprocess.run([sys.executable, "-c", WRITE_PAST_A_LIMIT, str(tmp_path / "f")], capture_output=True,
                       text=True, cwd=REPO, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == ["one write: 1000", f"write_all: {errno.EFBIG}"]


def test_a_read_past_the_end_names_the_file(tmp_path):
    from surgeon.io.fs import read_exact

    f = tmp_path / "short.safetensors"
    f.write_bytes(b"0123456789")
    fd = os.open(f, os.O_RDONLY)
    try:
        assert read_exact(fd, 4, 3, f) == b"3456" and read_exact(fd, 0, 10, f) == b""
        with pytest.raises(SurgeonError, match=r"short.safetensors: shorter than its header says \(nothing at byte 10\)"):
            read_exact(fd, 8, 5, f)
    finally:
        os.close(fd)


# ---------------------------------------------------------------- leftovers
def test_stale_staging_directories_of_any_name_are_removed_and_reported(donors_of, tmp_path, run_cli):
    """A killed writer's partial output is removed; the earlier output a killed --force had moved
    aside (`-old-`) is a user's: it goes back where it was, or stays where it is, never deleted."""
    a, _ = donors_of("olmoe", 2)
    dead = dead_pid()
    live = subprocess.Popen(["sleep", "60"])
    try:
        stale = [tmp_path / f".other.moe-surgeon-tmp-{dead}", tmp_path / f".z.moe-surgeon-tmp-{dead}"]
        moved = [tmp_path / f".x.y.moe-surgeon-old-{dead}", tmp_path / f".kept.moe-surgeon-old-{dead}"]
        for s in stale + moved:
            (s / "sub").mkdir(parents=True)
            (s / "sub" / "model.safetensors").write_bytes(b"partial" * 1000)
        (tmp_path / "kept").mkdir()  # its name was taken again: the moved-aside one stays hidden
        busy = tmp_path / f".busy.moe-surgeon-tmp-{live.pid}"
        busy.mkdir()
        unrelated = tmp_path / ".notes.moe-surgeon-tmp-abc"
        unrelated.mkdir()
        r = run_cli("export", tmp_path / "out", "--base", a)
        assert r.returncode == 0, r.stderr
        warnings = [line for line in r.stderr.splitlines() if "leftover" in line]
        assert len(warnings) == 1 and "removed 2 leftover" in warnings[0], r.stderr
        assert all(s.name in warnings[0] for s in stale)
        assert (tmp_path / "x.y" / "sub" / "model.safetensors").read_bytes() == b"partial" * 1000
        assert f"restored {tmp_path / 'x.y'}" in r.stderr and f"{moved[1]} holds an earlier output" in r.stderr
        # a live writer's stays, and so does the moved-aside output whose name is taken
        assert visible(tmp_path) == sorted(["out", "x.y", "kept", moved[1].name, busy.name, unrelated.name])
    finally:
        live.kill()
        live.wait()


def _unprivileged() -> list[str]:
    """A command prefix under which permission bits apply (root without its override capabilities)."""
    if os.geteuid() != 0:
        return []
    if not shutil.which("setpriv"):
        pytest.skip("root without setpriv: permission bits cannot be made to apply")
    return ["setpriv", "--bounding-set", "-dac_override,-dac_read_search,-fowner", "--"]


def test_force_over_an_output_with_read_only_parts_leaves_no_old_directory(donors_of, tmp_path):
    a, _ = donors_of("olmoe", 2)
    out = tmp_path / "out"
    # An earlier export of ours (--force replaces nothing else), with a read-only part added since.
    subprocess.run([*CLI, "export", str(out), "--base", a], check=True, capture_output=True, cwd=REPO, timeout=300)
    (out / "locked").mkdir(parents=True)
    (out / "locked" / "old.bin").write_bytes(b"old")
    (out / "locked").chmod(0o555)
    try:
        r = subprocess.run([*_unprivileged(), *CLI, "export", str(out), "--base", a, "--force"],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        assert visible(tmp_path) == ["out"]
        assert (out / "model.safetensors").exists() and not (out / "locked").exists()
    finally:
        for p in tmp_path.rglob("*"):
            if p.is_dir():
                p.chmod(0o755)


# ---------------------------------------------------------------- kill -9 during an export
@pytest.mark.slow
def test_an_export_killed_at_random_points_leaves_no_output_and_the_next_cleans_up(tmp_path):
    sys.path.insert(0, str(REPO))
    from bench.synthetic import write_donor

    donor = write_donor(tmp_path / "donor", 0, hidden=256, inter=128, layers=4, experts=32, vocab=4096,
                        shard_bytes=4 * 10**6)
    parent = tmp_path / "exports"
    parent.mkdir()
    rng = random.Random(14)
    killed_midway = 0
    for i in range(3):
        out = parent / f"hybrid{i}"
        # a dtype conversion and fsync per 2 MB shard make the export last a second or two
        p = subprocess.Popen([*CLI, "export", str(out), "--base", str(donor), "--dtype", "float32",
                              "--max-shard-size", "2MB", "--fsync"], cwd=REPO,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        staging = parent / f".{out.name}.moe-surgeon-tmp-{p.pid}"
        deadline = time.monotonic() + 120
        while not staging.exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.6))
        finished = p.poll() is not None
        p.send_signal(signal.SIGKILL)
        p.wait()
        if finished or out.exists():  # it won the race: then it is complete, never partial
            from surgeon.features.verify import run_verify

            assert run_verify(out).ok
            shutil.rmtree(out)
            continue
        killed_midway += 1
        assert not out.exists()
        assert [n for n in visible(parent) if not n.startswith(".")] == []
    assert killed_midway >= 2
    leftovers = [n for n in visible(parent) if ".moe-surgeon-" in n]
    assert leftovers  # what SIGKILL left behind, for the next export to remove

    r = subprocess.run([*CLI, "export", str(parent / "final"), "--base", str(donor)], capture_output=True,
                       text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"removed {len(leftovers)} leftover" in r.stderr
    assert visible(parent) == ["final"]


def test_an_output_name_near_the_filesystem_limit_is_written(donors_of, tmp_path, run_cli):
    """A legal 250-byte name: the staging name and a session's temporary name must fit too."""
    a, _ = donors_of("olmoe", 2)
    out, session = tmp_path / ("o" * 250), tmp_path / ("s" * 245 + ".json")
    r = run_cli("export", out, "--base", a, "--save-session", session)
    assert r.returncode == 0, r.stderr
    assert (out / "model.safetensors").is_file() and session.is_file()
    r = run_cli("export", out, "--base", a, "--force")
    assert r.returncode == 0, r.stderr
    assert visible(tmp_path) == sorted([out.name, session.name])
