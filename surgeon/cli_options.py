"""Options and error handling shared by the subcommands that run a model (probe, sweep, routing)."""

from __future__ import annotations

from contextlib import contextmanager

from .errors import SurgeonError

DTYPES = ["keep", "bfloat16", "float16", "float32"]


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
