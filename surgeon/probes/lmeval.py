"""lm-evaluation-harness tasks scored by our engine: `--probe lmeval:TASK[,first=N|limit=N][,shots=K]`.

lm-eval builds everything that defines the task: its documents, prompts, few-shot exemplars
(sampled with its default fewshot seed, as `simple_evaluate` does), the requests, the filters and
the per-document metrics. Only the model calls are ours (batched, shared-context scoring in
`scoring.py`, greedy decoding in `generation.py`), so per-item results are lm-eval's by
construction and a difference can only come from the model's numbers.

TASK is a name in lm-eval's task registry or a path to a task YAML. A local task YAML (and each file
it includes) is first read by our bounded, safe loader; one that would run code (a `!function`, a
dataset's `trust_remote_code`, a metric lm-eval loads from HF evaluate) is refused unless the user
passed --trust-task-code (ProbeSpec.trust_code), and only then does lm-eval's own loader import
anything. Templates render in Jinja's sandbox, since an unsandboxed one runs Python from a string.
Nothing is downloaded: a
dataset that is not on disk is an error that says how to point a local YAML at a data file.
A relative `data_files` path in a local YAML is read from the YAML's folder unless the working
directory has it (lm-eval reads it from the working directory only, where it rarely is).

lm-eval is an optional extra (`pip install 'moe-surgeon[lmeval]'`), imported only here, only
when a probe of this kind is loaded.
"""

from __future__ import annotations

import contextlib
import functools
import io
import math
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from surgeon.errors import SurgeonError
from surgeon.io.yaml_file import excerpt, load_yaml_file

from .types import Metric, ProbeKind, ProbeOutcome, ProbeSpec

FEWSHOT_SEED = 1234  # lm-eval's default fewshot_random_seed in simple_evaluate
_PROPORTIONS = {"acc", "acc_norm", "acc_bytes", "acc_mutual_info", "exact_match", "em"}  # 0/1 per item
_LOWER_IS_BETTER = {"perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte", "ter"}
_DIRECT_OPTIONS = {"kind", "data", "limit", "first", "shots", "seed", "trust_code"}  # the rest are the task's own
# lm-eval's own task YAMLs are a few kilobytes (the largest under 100 KB); far past that is not a task.
MAX_TASK_BYTES = 4 * 2**20
TASK_BYTES_ENV = "MOE_SURGEON_MAX_TASK_BYTES"


def metric_for(name: str) -> Metric:
    """The Metric an lm-eval metric name reads as; `name` may carry its filter ("exact_match,strict-match").

    lm-eval's 0/1 metrics are proportions, so the paired tests for proportions (McNemar) apply.
    """
    base = name.split(",")[0]
    return Metric(name, higher_is_better=base not in _LOWER_IS_BETTER, proportion=base in _PROPORTIONS)


KIND = ProbeKind("lmeval", "an lm-evaluation-harness task (its prompts, filters and metrics; our scoring)",
                 metric_for("acc"), items=None)


@dataclass
class LmevalTask:
    """A loaded lm-eval task and which of its documents a probe evaluates: the "items" of this
    kind (its length is the number of documents, what the runner counts progress in)."""

    name: str  # lm-eval's task name
    label: str  # what the user wrote, for messages
    task: Any  # lm_eval.api.task.Task, configured (num_fewshot, fewshot seed)
    first: int | None  # lm-eval's --limit: the first N documents
    indices: list[int] | None  # lm-eval's --samples: the documents limit= chose, in order
    docs: int

    def __len__(self) -> int:
        return self.docs


# ---------------------------------------------------------------- loading
def _lm_eval():
    """Import lm-eval offline: every dataset must come from disk (never a download)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        import lm_eval.tasks
        import lm_eval.utils
    except ImportError:
        raise SurgeonError("probe lmeval needs lm-evaluation-harness: pip install 'moe-surgeon[lmeval]'") from None
    _sandbox_templates(lm_eval.utils)
    return lm_eval


def _sandbox_templates(utils) -> None:
    """lm-eval renders doc_to_text and the like in a plain Jinja Environment, where
    `{{ cycler.__init__.__globals__.os.system(...) }}` runs a shell command: a task YAML's template
    is code too. Its sandbox renders every ordinary template the same and refuses such access."""
    from jinja2 import StrictUndefined
    from jinja2.sandbox import SandboxedEnvironment

    if isinstance(utils.env, SandboxedEnvironment):
        return
    env = SandboxedEnvironment(undefined=StrictUndefined, keep_trailing_newline=True)
    env.filters.update(utils.env.filters)  # lm-eval's regex_replace among them
    utils.env = env  # apply_template looks the module's env up at each call


@contextlib.contextmanager
def _quiet():
    """lm-eval and datasets draw progress bars and log warnings on stderr while they build
    requests; our own progress reports stand for them."""
    with contextlib.redirect_stderr(io.StringIO()):
        yield


@functools.lru_cache(maxsize=2)
def _task_manager(registry: bool):
    """lm-eval indexes its whole registry (thousands of YAMLs, seconds) per TaskManager: keep one.
    A local YAML is loaded from its config, already read and merged, so it needs no index: indexing
    its folder would read every *.yaml below it unbounded (a FIFO there hangs, an alias bomb fills
    memory), none of which the task uses."""
    from lm_eval.tasks import TaskManager

    with _quiet():
        return TaskManager() if registry else TaskManager(include_defaults=False)


def _is_path(data: str) -> bool:
    return data.endswith((".yaml", ".yml")) or os.sep in data or Path(data).is_file()


class _Function:
    """A `!function NAME` read as data: what the task would import and run, never imported here."""

    def __init__(self, name: str):
        self.name = name


@functools.cache
def _task_loader():
    import yaml

    class TaskLoader(yaml.SafeLoader):
        """YAML as lm-eval's task loader reads it, minus the import its `!function` tag does."""

    TaskLoader.add_constructor("!function", lambda loader, node: _Function(loader.construct_scalar(node)))
    return TaskLoader


def _functions_in(value, path: Path) -> list[tuple[str, Path]]:
    """Every `!function` in a config, with the file it is written in; shared (aliased) values are
    visited once, so a recursive alias ends."""
    found, seen, todo = [], set(), [value]
    while todo:
        v = todo.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, _Function):
            found.append((v.name, path))
        elif isinstance(v, dict):
            todo.extend(reversed([*v.keys(), *v.values()]))
        elif isinstance(v, list):
            todo.extend(reversed(v))
    return found


def _read_task_yaml(path: Path, chain: tuple[Path, ...] = (), seen: set | None = None):
    """(config with its includes merged as lm-eval's load_yaml merges them, the `!function`s of every
    file read) for a local task YAML, read with our size cap and alias limit and nothing imported."""
    seen = set() if seen is None else seen
    if path in chain:
        cycle = " -> ".join(p.name for p in (*chain[chain.index(path):], path))
        raise SurgeonError(f"{chain[0]}: include cycle ({cycle})")
    if path in seen:  # lm-eval's own loader refuses a file read twice too
        raise SurgeonError(f"{chain[-1]}: includes {path} a second time; lm-eval reads each file once")
    seen.add(path)
    cfg = load_yaml_file(path, "task YAML", MAX_TASK_BYTES, TASK_BYTES_ENV, loader=_task_loader())
    if not isinstance(cfg, dict):
        raise SurgeonError(f"{path}: a task YAML is a mapping of config keys, not a {type(cfg).__name__}")
    functions = _functions_in(cfg, path)
    if "include" not in cfg:
        return cfg, functions
    includes = cfg.pop("include")
    merged: dict = {}
    for inc in includes if isinstance(includes, list) else [includes]:
        if not isinstance(inc, str) or not inc or "\0" in inc:
            raise SurgeonError(f"{path}: include names a YAML file, not {excerpt(repr(inc), 60)}")
        try:
            target = (Path(inc) if Path(inc).is_absolute() else path.parent / inc).expanduser().resolve()
        except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop before Python 3.13
            raise SurgeonError(f"{path}: include {excerpt(inc, 80)}: {e}") from None
        sub, more = _read_task_yaml(target, (*chain, path), seen)
        sub.pop("task_list", None)  # as lm-eval: a task list belongs to the file that has it
        merged.update(sub)
        functions += more
    merged.update(cfg)  # the including file's own keys win
    return merged, functions


def _code_it_runs(cfg: dict, functions: list[tuple[str, Path]], path: Path) -> str | None:
    """What Python a local task would run beyond lm-eval's own, in a phrase; None when none."""
    if functions:
        name, where = functions[0]
        return f"Python from its folder (!function {excerpt(str(name), 80)} in {where})"
    kwargs = cfg.get("dataset_kwargs")
    if isinstance(kwargs, dict) and kwargs.get("trust_remote_code"):
        return f"its dataset's own code (dataset_kwargs.trust_remote_code: true in {path})"
    import importlib

    importlib.import_module("lm_eval.api.metrics")  # fills the registry, as lm-eval's get_metric does
    from lm_eval.api.registry import metric_registry

    metrics = cfg.get("metric_list") or []
    if not isinstance(metrics, list):
        raise SurgeonError(f"{path}: metric_list is a list of metrics, not {excerpt(repr(metrics), 40)}")
    for entry in metrics:
        metric = entry.get("metric") if isinstance(entry, dict) else None
        # A name lm-eval does not know is handed to HF evaluate.load, which runs a local script
        # such as ./m.py (and would fetch one from the Hub online).
        if isinstance(metric, str) and (metric not in metric_registry or entry.get("hf_evaluate") is True):
            return f"an HF evaluate metric's script (metric {excerpt(metric, 80)} in {path} is not one of lm-eval's own)"
    return None


def _local_path(label: str, data: str) -> Path:
    try:
        return Path(data).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as e:
        raise SurgeonError(f"{label}: not a usable path ({e})") from None


def task_code(spec) -> str | None:
    """What code the task of `spec` runs beyond lm-eval's installed own (see _code_it_runs): only a
    local task YAML can carry any. For the CLI, to record in a session that a run trusted it."""
    if not _is_path(spec.data):
        return None
    _lm_eval()
    path = _local_path(f"lmeval:{spec.data}", spec.data)
    return _code_it_runs(*_read_task_yaml(path), path)


def _local_config(label: str, path: Path, trusted: bool) -> dict:
    """The YAML's full config (includes merged, !function resolved), data files made absolute.
    Code the task carries is refused here unless `trusted`; only then does lm-eval's own loader read
    the files (and import what their !function tags name)."""
    try:
        cfg, functions = _read_task_yaml(path)
    except SurgeonError as e:
        raise SurgeonError(f"{label}: {e}") from None
    if isinstance(cfg.get("group"), str) or not isinstance(cfg.get("task"), str) or "class" in cfg:
        raise SurgeonError(f"{path}: a task YAML with `task: NAME` is needed (groups and Python tasks are not)")
    code = _code_it_runs(cfg, functions, path)
    if code is not None and not trusted:
        raise SurgeonError(f"{label}: the task runs {code}; pass --trust-task-code to run it")
    if code is not None:
        from lm_eval.tasks._yaml_loader import load_yaml

        try:
            cfg = load_yaml(path, resolve_func=True)
        except Exception as e:  # noqa: BLE001 -- the !function's module: missing, or failing on import
            raise SurgeonError(f"{label}: cannot read {path}: {_first_line(e)}") from None
    kwargs = cfg.get("dataset_kwargs") or {}
    if not isinstance(kwargs, dict):
        raise SurgeonError(f"{path}: dataset_kwargs is a mapping, not {excerpt(repr(kwargs), 60)}")
    if "data_files" in kwargs:
        cfg["dataset_kwargs"] = {**kwargs, "data_files": _beside(kwargs["data_files"], path.parent)}
        _check_data_files(cfg["dataset_kwargs"]["data_files"], path)
    return cfg


def _check_data_files(files, path: Path) -> None:
    """A data file that exists must be a regular file: datasets would read /dev/zero or a FIFO for
    ever. (A pattern matching nothing yet is datasets' to report.)"""
    if isinstance(files, dict):
        for v in files.values():
            _check_data_files(v, path)
    elif isinstance(files, list):
        for v in files:
            _check_data_files(v, path)
    elif isinstance(files, str):
        try:
            special = Path(files).exists() and not Path(files).is_file()
        except (OSError, ValueError):  # a name the filesystem cannot hold: nothing to read
            return
        if special:
            raise SurgeonError(f"{path}: data file {excerpt(files, 80)} is not a regular file (a directory, a "
                               "device or a FIFO)")


def _beside(files, folder: Path):
    """Relative data files read from the YAML's folder unless the working directory has them
    (where lm-eval looks), so a missing one is reported where the user meant it to be."""
    if isinstance(files, dict):
        return {k: _beside(v, folder) for k, v in files.items()}
    if isinstance(files, list):
        return [_beside(v, folder) for v in files]
    if isinstance(files, str) and not Path(files).is_absolute():
        try:
            here = Path(files).exists()
        except (OSError, ValueError):  # a NUL or an overlong name: no file the working directory has
            here = False
        if not here:
            return str(folder / files)
    return files


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def _dataset_of(tm, name: str, cfg: dict | None) -> str:
    """`path[/name]` of a task's dataset, for messages; read without instantiating the task."""
    if cfg is None:
        from lm_eval.tasks._yaml_loader import load_yaml

        entry = tm.task_index.get(name)
        try:
            cfg = load_yaml(entry.yaml_path, resolve_func=False) if entry and entry.yaml_path else {}
        except Exception:  # noqa: BLE001 -- only for a message
            cfg = {}
    path, sub = cfg.get("dataset_path"), cfg.get("dataset_name")
    return f"{path}/{sub}" if path and sub else str(path or "?")


def _build_task(label: str, data: str, trusted: bool = False):
    """(task name, lm-eval Task) for a registry name or a YAML path; a YAML's own code runs only
    when `trusted` (lm-eval's registry is its installed code, trusted as lm-eval itself is)."""
    cfg = None
    if _is_path(data):
        path = _local_path(label, data)
        cfg = _local_config(label, path, trusted)
        tm, spec, name = _task_manager(False), cfg, cfg["task"]
    else:
        tm, spec, name = _task_manager(True), data, data
        if name not in tm.task_index:
            raise SurgeonError(f"{label}: {name!r} is not an lm-eval task (nor a task YAML path); "
                               "`lm-eval ls tasks` lists them")
    try:
        with _quiet():
            loaded = tm.load([spec])
    except (ConnectionError, FileNotFoundError) as e:
        dataset = _dataset_of(tm, name, cfg)
        if isinstance(e, FileNotFoundError) and dataset.startswith(("json", "csv", "parquet", "text")):
            raise SurgeonError(f"{label}: task {name}: data file not found: {_first_line(e)}") from None
        raise SurgeonError(
            f"{label}: task {name} needs dataset {dataset}, which is not on this machine (probes never "
            "download); write a local task YAML with `dataset_path: json` and "
            "`dataset_kwargs: {data_files: {test: FILE.jsonl}}` and pass its path") from None
    except SurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 -- lm-eval's own errors: a bad config, template or metric
        raise SurgeonError(f"{label}: lm-eval cannot load task {name}: {type(e).__name__}: {_first_line(e)}") from None
    tasks = loaded["tasks"]
    if len(tasks) != 1:
        raise SurgeonError(f"{label}: {name} is a group of {len(tasks)} tasks; name one of them "
                           f"(e.g. {', '.join(sorted(tasks)[:3])})")
    (name, task), = tasks.items()
    return name, task


def _configure_shots(label: str, task, shots: int | None) -> None:
    """num_fewshot and the fewshot seed as lm-eval's simple_evaluate sets them."""
    default = task.get_config("num_fewshot")
    if shots is not None:
        if default == 0 and shots != 0:
            # lm-eval ignores --num_fewshot for such a task; saying so beats a silent 0-shot.
            raise SurgeonError(f"{label}: task {task.config.task} fixes num_fewshot: 0 in its config; "
                               "drop shots= (lm-eval would ignore it too)")
        task.set_config(key="num_fewshot", value=shots)
    elif default is None:
        task.set_config(key="num_fewshot", value=0)
    task.set_fewshot_seed(seed=FEWSHOT_SEED)
    k = task.get_config("num_fewshot")
    if k:
        try:
            pool = len(task.fewshot_docs() or [])
        except Exception:  # noqa: BLE001 -- lm-eval falls back on its own rule; its error, if any, comes when building
            return
        # Exemplars come from the evaluated split itself: the document is left out of its own.
        need = k + 1 if task.fewshot_cfg.split == task.config.test_split else k
        if pool < need:
            raise SurgeonError(f"{label}: shots={k} needs {need} few-shot documents; task "
                               f"{task.config.task} has {pool}")


def _chosen_docs(spec, total: int) -> list[int] | None:
    """The documents limit= picks: our seeded subset (surgeon.probes.data.subset) over doc ids."""
    if spec.limit is None:
        return None
    from surgeon.probes.data import Item, subset

    chosen = subset([Item(str(i)) for i in range(total)], spec.limit, spec.seed)
    return None if len(chosen) == total else [int(it.id) for it in chosen]


def _check_options(spec, label: str) -> None:
    defaults = ProbeSpec(spec.kind, spec.data)
    own = [f.name for f in fields(spec) if f.name not in _DIRECT_OPTIONS
           and getattr(spec, f.name) != getattr(defaults, f.name)]
    if own:
        raise SurgeonError(f"{label}: option {own[0]} does not apply to lmeval (the task's config sets it); "
                           "options: first, limit, seed, shots")
    first = spec.first
    if first is not None and spec.limit is not None:
        raise SurgeonError(f"{label}: first= and limit= together; first=N takes the first N documents, "
                           "limit=N a seeded subset")
    if first is not None and first < 1:
        raise SurgeonError(f"{label}: first must be at least 1, got {first}")
    if spec.limit is not None and spec.limit < 1:
        raise SurgeonError(f"{label}: limit must be at least 1, got {spec.limit}")
    if spec.shots is not None and spec.shots < 0:
        raise SurgeonError(f"{label}: shots must be at least 0, got {spec.shots}")


def load_task(spec) -> LmevalTask:
    """Load and check the task of `spec` (before any model is loaded): its dataset, its output
    type, greedy generation, and that its requests build for the documents chosen."""
    label = f"lmeval:{spec.data}"
    _check_options(spec, label)
    _lm_eval()
    name, task = _build_task(label, spec.data, spec.trust_code)
    try:
        return _checked(spec, label, name, task)
    except SurgeonError:
        raise
    except Exception as e:  # noqa: BLE001 -- lm-eval meeting a config value of the wrong type (num_fewshot: "2")
        raise SurgeonError(f"{label}: lm-eval cannot use task {name}: {type(e).__name__}: {_first_line(e)}") from None


def _checked(spec, label: str, name: str, task) -> LmevalTask:
    output_type = task.get_config("output_type")
    if output_type == "loglikelihood_rolling":
        raise SurgeonError(f"{label}: task {name} scores rolling log-likelihoods (perplexity), "
                           "which the lmeval probe does not support yet; use a ppl probe")
    if output_type == "generate_until":
        _generation(label, task.get_config("generation_kwargs") or {})
    _configure_shots(label, task, spec.shots)
    try:
        total = len(task.eval_docs)
    except Exception as e:  # noqa: BLE001
        raise SurgeonError(f"{label}: task {name} has no documents to evaluate: {_first_line(e)}") from None
    loaded = LmevalTask(name, label, task, spec.first, _chosen_docs(spec, total), 0)
    _build_requests(loaded)
    loaded.docs = len({inst.doc_id for inst in task.instances})
    return loaded


def _build_requests(t: LmevalTask) -> None:
    """Fresh instances (no responses) with the few-shot sampler reseeded, so every model a probe
    measures (hybrid, donors) gets the same prompts, as separate lm-eval runs would."""
    t.task.set_fewshot_seed(seed=FEWSHOT_SEED)
    try:
        with _quiet():
            t.task.build_all_requests(limit=t.first, samples=t.indices, rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001 -- a template error, too few few-shot documents for shots=
        raise SurgeonError(f"{t.label}: lm-eval cannot build the requests of {t.name}: "
                           f"{type(e).__name__}: {_first_line(e)}") from None


def _generation(label: str, gen_kwargs: dict) -> tuple[tuple[str, ...], int]:
    """(until, max new tokens) of a generate_until request, read with lm-eval's own rules
    (aliases of max_gen_toks, do_sample vs temperature); only greedy decoding is supported."""
    from lm_eval.models.utils import normalize_gen_kwargs

    kwargs = normalize_gen_kwargs(dict(gen_kwargs), 256)  # 256: lm-eval's HFLM.max_gen_toks
    if kwargs.get("do_sample") or int(kwargs.get("num_beams", 1) or 1) > 1:
        raise SurgeonError(f"{label}: the task samples or beam-searches ({gen_kwargs}); only greedy "
                           "decoding is supported (do_sample: false, temperature: 0)")
    return tuple(kwargs["until"]), int(kwargs["max_gen_toks"])


# ---------------------------------------------------------------- running
def run(model, tokenizer, spec, items, shots, template, *, batch_size=16, progress=None) -> ProbeOutcome:
    """Score the task's requests with our engine, then let lm-eval filter and score each document.
    `items` is what load_task returned (loaded again when it is not); shots and template are the
    task's own."""
    loaded = items if isinstance(items, LmevalTask) else load_task(spec)
    _build_requests(loaded)
    instances = loaded.task.instances
    _respond(model, tokenizer, loaded.label, instances, batch_size, progress)
    return _outcome(loaded)


def _respond(model, tokenizer, label, instances, batch_size, progress) -> None:
    """Fill each instance's responses as lm-eval's evaluator does (one per repeat)."""
    # torch, only when a probe runs
    from surgeon.probes.generation import greedy_generate
    from surgeon.probes.scoring import loglikelihoods

    by_type: dict[str, list] = {}
    for inst in instances:
        by_type.setdefault(inst.request_type, []).append(inst)
    unknown = set(by_type) - {"loglikelihood", "generate_until"}
    if unknown:
        raise SurgeonError(f"{label}: requests of type {', '.join(sorted(unknown))} are not supported yet")
    total, done = len(instances), [0]

    def step(n: int):
        start = done[0]

        def report(d: int, t: int) -> None:
            if progress is not None:
                progress(start + (round(n * d / t) if t else n), total)
        done[0] += n
        return report

    lls = by_type.get("loglikelihood", [])
    if lls:
        results = loglikelihoods(model, tokenizer, [inst.args[:2] for inst in lls], batch_size=batch_size,
                                 progress=step(len(lls)))
        for inst, r in zip(lls, results):
            inst.resps = [(float(r.logprob), bool(r.greedy))] * inst.repeats
    # One batched call per (stop strings, max tokens): requests of a task usually share both.
    groups: dict[tuple, list] = {}
    for inst in by_type.get("generate_until", []):
        groups.setdefault(_generation(label, inst.args[1]), []).append(inst)
    for (until, max_new), group in groups.items():
        texts = greedy_generate(model, tokenizer, [inst.args[0] for inst in group], until=until,
                                max_new_tokens=max_new, batch_size=batch_size, progress=step(len(group)))
        for inst, text in zip(group, texts):
            inst.resps = [text] * inst.repeats  # greedy: every repeat is the same
    if progress is not None:
        progress(total, total)


def _outcome(loaded: LmevalTask) -> ProbeOutcome:
    """lm-eval's filters and process_results per document, as its evaluator runs them."""
    task = loaded.task
    with _quiet():
        task.apply_filters()
    by_doc: dict[int, list] = {}
    for inst in task.instances:
        by_doc.setdefault(inst.doc_id, []).append(inst)
    for reqs in by_doc.values():
        reqs.sort(key=lambda inst: inst.idx)
    filters = list(task.instances[0].filtered_resps)
    docs = list(task.doc_iterator(rank=0, limit=loaded.first, world_size=1, samples=loaded.indices))
    per_metric: dict[str, list] = {}
    samples = []
    for doc_id, doc in docs:
        reqs = by_doc[doc_id]
        true_id = loaded.indices[doc_id] if loaded.indices else doc_id
        sample = {"doc_id": true_id, "doc": doc, "target": _plain(task.doc_to_target(doc)),
                  "arguments": [_plain(r.args) for r in reqs], "resps": [_plain(r.resps) for r in reqs]}
        filtered, values = {}, {}
        for key in filters:
            responses = [r.filtered_resps[key] for r in reqs]
            filtered[key] = _plain(responses)
            try:
                metrics = task.process_results(doc, responses)
            except Exception as e:  # noqa: BLE001
                raise SurgeonError(f"{loaded.label}: lm-eval cannot score document {true_id}: "
                                   f"{type(e).__name__}: {_first_line(e)}") from None
            for metric, value in metrics.items():
                name = metric if key == "none" else f"{metric},{key}"
                per_metric.setdefault(name, []).append(value)
                values[name] = _plain(value)
        sample["filtered_resps"] = filtered["none"] if filters == ["none"] else filtered
        samples.append({**sample, **values})
    means = [name for name in per_metric if _per_item(task, name, per_metric[name])]
    if not means:
        raise SurgeonError(f"{loaded.label}: none of task {loaded.name}'s metrics ({', '.join(per_metric)}) "
                           "is a mean over documents, so none has per-item outcomes")
    outcomes = {name: [float(v) for v in per_metric[name]] for name in means}
    primary = means[0]
    outputs = []
    if task.get_config("output_type") == "generate_until":
        outputs = [str(by_doc[doc_id][0].resps[0]) for doc_id, _ in docs]
    return ProbeOutcome([str(s["doc_id"]) for s in samples], outcomes.pop(primary), outputs=outputs,
                        metric=primary, extra=outcomes, samples=samples)


def _per_item(task, name: str, values: list) -> bool:
    """A metric whose score is the mean of its per-document numbers (acc, exact_match), unlike
    corpus metrics (f1, bleu, perplexity) that lm-eval aggregates another way."""
    agg = task.aggregation().get(name.split(",")[0])
    if getattr(agg, "__name__", agg) != "mean":
        return False
    try:
        return all(math.isfinite(float(v)) for v in values)
    except (TypeError, ValueError):
        return False


def _plain(value):
    """JSON-ready: numpy scalars to Python numbers, tuples to lists."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


def content_digest(t: LmevalTask) -> str:
    """What the task evaluates, as a hash (the donor score cache's key, see run.ScoreCache): lm-eval's
    version, the task's whole config (a function as its source, as lm-eval dumps it, and the bytes
    of the file it is written in, so a helper it calls counts too), the documents scored and the
    few-shot pool. A value that cannot be written out stably (an object's address) can only cost a
    cache miss, never a stale hit."""
    import hashlib
    import inspect
    import json

    lm_eval = _lm_eval()
    digest = hashlib.sha256(json.dumps([getattr(lm_eval, "__version__", "?"), t.name, t.first, t.indices,
                                        t.task.get_config("num_fewshot")]).encode())
    config = t.task.config
    digest.update(json.dumps(config.to_dict(), sort_keys=True, default=repr).encode())
    sources = set()
    for value in [*vars(config).values(), *(m.get("metric") for m in config.metric_list or [] if isinstance(m, dict))]:
        if callable(value):
            try:
                sources.add(inspect.getsourcefile(value))
            except TypeError:
                pass
    for source in sorted(s for s in sources if s):
        try:
            digest.update(Path(source).read_bytes())
        except OSError:
            digest.update(f"{source}: unreadable".encode())
    with _quiet():
        docs = [t.task.eval_docs]
        with contextlib.suppress(Exception):  # a task without a few-shot split: lm-eval's own rule applies
            docs.append(t.task.fewshot_docs() or [])
    for part in docs:
        for doc in part:
            digest.update(json.dumps(doc, sort_keys=True, default=repr).encode())
        digest.update(b";")
    return digest.hexdigest()
