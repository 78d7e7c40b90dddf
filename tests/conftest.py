import os
import signal
import subprocess
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import pytest
from tiny_models import make_donor, save_char_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test never downloads
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # nor does lm-eval's datasets (it sets this itself too)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

# A shell starts a background job with SIGINT ignored, and an ignored signal stays ignored in
# every child: ctrl+c tests (a real process interrupted mid-export) would then see no interrupt.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Under pytest-xdist each worker (and every CLI subprocess it starts) gets its share of the cores
# for torch: N workers with a thread per core each oversubscribe the machine, and an
# oversubscribed torch pool is many times slower than one thread. Set before torch is imported.
if "PYTEST_XDIST_WORKER_COUNT" in os.environ and "OMP_NUM_THREADS" not in os.environ:
    os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# And each starts as the command line does: the OpenMP wait policy set before torch loads
# (surgeon/live/threads.py). Otherwise the first in-process command of a worker that has not
# imported torch yet sets it, and run_cli reports that as state the command left behind: a file
# such as test_provenance.py failed when it ran alone.
from surgeon.live.threads import configure_threads  # noqa: E402

configure_threads()

# Tests in other files that take more than ~2 s on two idle cores for a reason other than a
# subprocess (training, sweeps, many forward passes, big donors), as "file::test" without
# parameters; files of their own mark theirs with @pytest.mark.slow. Every test that uses the
# `cli` fixture is slow too (a Python start-up plus torch's import per call), so
# `python -m pytest -m "not slow"` is the quick loop.
SLOW = {
    "test_analysis_jobs.py::test_routing_probe_reports_sequences_and_stops_between_batches",
    "test_sweep.py::test_power_set_one_group_per_step_and_live_weights_equal_fresh",
    "test_sweep.py::test_exception_from_a_callback_then_resume_equals_uninterrupted",
    "test_tui_gates.py::test_gates_screen_measures_the_hybrids_gates_and_drops_the_bad_ones_in_one_undo",
    "test_tui_heatmap.py::test_routing_screen_views_selection_actions_and_save",
    "test_tui_mix.py::test_mix_is_offered_only_when_every_donor_is_dense",
    "test_tui_mix.py::test_bad_input_shows_in_the_form_never_a_traceback",
    "test_tui_mix.py::test_router_training_shows_its_loss_curve_and_can_be_cancelled",
    "test_tui_mix.py::test_an_unsaved_mix_survives_a_crash",
    "test_tui_probes.py::test_a_rerun_after_a_mark_swaps_only_the_changed_tensors_into_the_same_hybrid",
    "test_tui_probes.py::test_cancel_stops_a_run_and_records_nothing",
    "test_tui_probes.py::test_results_table_shows_the_engines_numbers_and_ctrl_s_saves_them",
    "test_tui_probes.py::test_bad_probe_input_is_an_error_and_leaves_the_results_alone",
    "test_tui_sweep.py::test_bad_group_is_one_error_dialog_and_nothing_runs",
    "test_tui_sweep.py::test_sweep_screen_runs_stores_and_opens_a_configuration",
    "test_tui_sweep.py::test_escape_stops_a_sweep_at_the_next_batch_and_r_resumes_it",
}


def pytest_collection_modifyitems(config, items):
    seen = set()
    for item in items:
        name = f"{Path(str(item.fspath)).name}::{item.originalname}"
        if "cli" in item.fixturenames:
            item.add_marker(pytest.mark.subprocess)
            item.add_marker(pytest.mark.slow)
        elif name in SLOW:
            item.add_marker(pytest.mark.slow)
            seen.add(name)
    whole_suite = not config.args or [Path(a).resolve() for a in config.args] == [
        Path(config.rootpath, p).resolve() for p in config.getini("testpaths")]
    if whole_suite and not config.option.keyword and SLOW - seen:
        warnings.warn(pytest.PytestWarning(f"conftest.SLOW names tests that no longer exist: {sorted(SLOW - seen)}"))


@pytest.fixture(autouse=True, scope="session")
def _score_cache(tmp_path_factory):
    """Donor scores and distances are cached on disk, and the workbench keeps a recovery file:
    tests keep theirs apart from the user's."""
    os.environ["MOE_SURGEON_CACHE"] = str(tmp_path_factory.mktemp("score-cache"))
    os.environ["MOE_SURGEON_STATE_DIR"] = str(tmp_path_factory.mktemp("state"))


@pytest.fixture(scope="module")
def one_torch_thread():
    """For modules that run many small forward passes: on CI's two shared cores an oversubscribed
    torch thread pool is up to 20x slower than one thread. Use with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def donors_of(tmp_path_factory):
    """donors_of(model_type, n) -> n tiny donors of that architecture (seeds 0..n-1), built once."""
    cache = {}

    def get(model_type: str, n: int = 4):
        key = (model_type, n)
        if key not in cache:
            root = tmp_path_factory.mktemp(model_type)
            cache[key] = [save_char_tokenizer(make_donor(root / f"donor{i}", model_type, seed=i)) for i in range(n)]
        return cache[key]

    return get


@pytest.fixture(scope="session")
def moe_pair(tmp_path_factory):
    """moe_pair(model_type) -> two tiny random donors of any text MoE family (seeds 0 and 1), made with
    its own config class (tiny_models.conformance_donor) and built once per session."""
    from tiny_models import conformance_donor

    made = {}

    def get(model_type: str):
        if model_type not in made:
            root = tmp_path_factory.mktemp(f"pair-{model_type}")
            made[model_type] = tuple(conformance_donor(root / f"d{seed}", model_type, seed) for seed in (0, 1))
        return made[model_type]

    return get


@pytest.fixture(scope="module")
def char_olmoe(donors_of):
    """(model, tokenizer) of a tiny OLMoE donor saved with the character tokenizer (bos 1, eos 2)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = donors_of("olmoe", 1)[0]
    return AutoModelForCausalLM.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


class CliResult(NamedTuple):
    """What `moe-surgeon ARGS` did; the attributes of subprocess.CompletedProcess, also unpackable."""

    returncode: int
    stdout: str
    stderr: str


def subprocess_cli(*args, cwd=None, env=None):
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "surgeon.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600,
    )


@pytest.fixture
def cli():
    """End to end: the console entry point in a fresh interpreter (start-up, lazy imports, exit
    code). Costs a Python start-up and its imports per call: for error paths use `run_cli`."""
    return subprocess_cli


# Set by a library the first time it is imported (torch's inductor), not by the command.
LIBRARY_ENV = {"TORCHINDUCTOR_CACHE_DIR"}


def _process_state() -> dict:
    """What a command must leave as it found it when it runs inside a longer-lived process."""
    env = {k: v for k, v in os.environ.items() if k not in LIBRARY_ENV}
    state = {"cwd": os.getcwd(), "sigint": signal.getsignal(signal.SIGINT)}
    state.update({f"${k}": v for k, v in env.items()})
    if "torch" in sys.modules:
        import torch

        state["torch threads"] = torch.get_num_threads()
        state["torch deterministic"] = torch.are_deterministic_algorithms_enabled()
        state["torch grad"] = torch.is_grad_enabled()
    return state


@contextmanager
def _cwd_env(cwd, env):
    old_cwd, old_env = os.getcwd(), dict(os.environ)
    try:
        if cwd is not None:
            os.chdir(cwd)
        os.environ.update({k: str(v) for k, v in (env or {}).items()})
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.clear()
        os.environ.update(old_env)


@pytest.fixture
def run_cli(capsys):
    """run_cli(*args, cwd=None, env=None) -> CliResult: `moe-surgeon ARGS` through
    surgeon.cli.main.main in this process, output captured. No interpreter start-up, so error
    paths cost milliseconds; fails the test if the command leaves process state behind."""
    from surgeon.cli.main import main

    def run(*args, cwd=None, env=None) -> CliResult:
        capsys.readouterr()  # what the test printed before is not the command's output
        with _cwd_env(cwd, env):
            before = _process_state()
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, usage errors
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            after = _process_state()
        out, err = capsys.readouterr()
        left = {k: (before.get(k), after.get(k)) for k in before.keys() | after.keys()
                if before.get(k) != after.get(k) and not (k.startswith("torch") and k not in before)}
        assert not left, f"moe-surgeon {' '.join(map(str, args))} left process state behind: {left}"
        return CliResult(code, out, err)

    return run
