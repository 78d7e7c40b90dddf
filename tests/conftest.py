import os
import subprocess
import sys

import pytest
from tiny_models import make_donor, save_char_tokenizer

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a test never downloads
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


@pytest.fixture(autouse=True, scope="session")
def _score_cache(tmp_path_factory):
    """Donor scores are cached on disk; tests keep theirs apart from the user's cache."""
    os.environ["MOE_SURGEON_CACHE"] = str(tmp_path_factory.mktemp("score-cache"))


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


def run_cli(*args, cwd=None, env=None):
    """Run the real console entry point in a subprocess, as a user would."""
    return subprocess.run(
        [sys.executable, "-m", "surgeon.cli", *map(str, args)],
        capture_output=True, text=True, cwd=cwd, env={**os.environ, **(env or {})}, timeout=600,
    )


@pytest.fixture
def cli():
    return run_cli

