"""Options and error handling shared by the subcommands."""

from __future__ import annotations

from contextlib import contextmanager

from surgeon.errors import SurgeonError
from surgeon.io.dtypes import DTYPE_CHOICES as DTYPES


def add_model_options(p, batch_size: int = 16) -> None:
    p.add_argument("--device", help="cpu, cuda, cuda:N, or auto to spread a large hybrid over every GPU "
                   "(accelerate's device_map=auto); default: cuda when present")
    p.add_argument("--dtype", default="keep", choices=DTYPES, help="compute dtype of the live model")
    p.add_argument("--batch-size", type=int, default=batch_size)
    p.add_argument("--allow-pickle", action="store_true", help="load pickle-only donors with weights_only=True")


@contextmanager
def out_of_memory_is_an_error(device: str):
    """Running out of memory is a matter of settings, not a bug: say which ones to change."""
    try:
        yield
    except MemoryError:
        raise SurgeonError(f"out of memory on {device}; try a smaller --batch-size") from None
    except RuntimeError as e:  # torch.cuda.OutOfMemoryError is a RuntimeError
        if "out of memory" not in str(e):
            raise
        raise SurgeonError(f"out of GPU memory on {device}; try a smaller --batch-size or --device cpu") from None


def common_export_options(p) -> None:
    p.add_argument("--dtype", default="keep", choices=DTYPES,
                   help="dtype of the written tensors (default keep; e_score_correction_bias stays fp32)")
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--fsync", action="store_true", help="flush every shard to disk before the final rename")
    p.add_argument("--allow-pickle", action="store_true", help="load pickle-only donors with weights_only=True")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def add_smaller_moe_options(p, *, rebuilt_from: str, record: str) -> None:
    """What `prune` and `merge-experts` share after their own choice options: the calibration
    corpora, the model options, the writer's and the session's. `rebuilt_from` says what a replay
    reads back; `record` what --json prints."""
    from surgeon.features.routing.corpora import DEFAULT_CORPORA

    p.add_argument("--corpus", action="append", default=[], metavar="NAME=FILE",
                   help="a calibration corpus: a built-in probe set name, a .jsonl probe file or a text file "
                   f"(paragraphs); repeatable, pooled (default: {', '.join(DEFAULT_CORPORA)})")
    p.add_argument("--max-tokens", type=int, default=None, help="read at most this many tokens per corpus")
    add_model_options(p)
    p.add_argument("--max-shard-size", default="5GB", help="largest shard, e.g. 5GB or 500MB (default 5GB)")
    p.add_argument("--force", action="store_true", help="replace an output directory moe-surgeon wrote")
    p.add_argument("--fsync", action="store_true", help="flush every shard to disk before the final rename")
    p.add_argument("--save-session", metavar="FILE",
                   help=f"also save a session: `moe-surgeon replay FILE --export DIR` rebuilds the same bytes from {rebuilt_from}")
    p.add_argument("--json", action="store_true", help=f"print the record ({record}) as JSON")
