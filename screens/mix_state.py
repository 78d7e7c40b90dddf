"""What the mix form and the welcome line need beyond the engine's mix (surgeon.features.mix.workbench:
MixWorkbench, MixState, restore_mix): the demo's recipe, paths as the form shows them, the line above
the grid. No Textual here either.
"""

from __future__ import annotations

import os
from pathlib import Path

from surgeon.core.donor import DEMO_ROOT, Donor
from surgeon.features.mix.router_train import TrainSpec
from surgeon.features.mix.workbench import MixState, dense_problem

DEMO_MIX = DEMO_ROOT.parent / "mix"
# The demo's recipe (docs/mix.md): router training is what makes the toy mix work.
DEMO_TRAIN = {"steps": 600, "lr": 0.02, "batch_size": 32}
CLI_TRAIN = {"steps": TrainSpec.steps, "lr": TrainSpec.lr, "batch_size": TrainSpec.batch_size}  # `mix`'s defaults


def is_demo(donors: dict[str, Donor]) -> bool:
    root = DEMO_ROOT.resolve()
    return all(root in d.path.resolve().parents for d in donors.values())


def shown_path(path: str | os.PathLike) -> str:
    """A path as the form shows it: relative to the working directory when it is inside it."""
    rel = os.path.relpath(Path(path).resolve(), Path.cwd())
    return str(path) if rel.startswith("..") else rel


# ---------------------------------------------------------------- the line above the grid
def banner(wb, mix: MixState | None, pending: MixState | None, labels: dict[str, str]) -> str | None:
    """What the welcome line says about mixing; None when there is nothing to say."""
    if wb is None:
        return None
    if mix is not None and mix.name in wb.donors:
        head = f"{mix.name} is the MoE mixed from dense donors: {mix.experts_text(labels)} ({mix.summary()}). "
        if mix.matches(wb):
            return head + ("The experts column shows them. p probes the mix against its donors, R shows its "
                           "routing, ctrl+s saves a session `replay` rebuilds.")
        return head + f"With marks on it, the session records this hybrid of {mix.export}, not how the mix was made."
    if dense_problem(wb.donors) is None:
        kind = next(iter(wb.donors.values())).model_type
        if pending is not None:
            return (f"This session records a mix of these dense {kind} donors whose export is missing: "
                    "press M to build it again.")
        return (f"Dense {kind} donors are open. M: mix into an MoE, their MLPs becoming its experts "
                "(moetify: Lee, Wynter and Ganti, 2024); the grid's marks choose attention, norms and embeddings.")
    return None
