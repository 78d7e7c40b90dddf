"""The one table of the screens the app opens by name, and how each opens.

`SurgeonApp.open_screen(name, ...)` reads it, and every place that opens one of these screens goes
through it: the app's actions and key bindings, the grid's keys (surgery.py), the distance map
opening a layer. A modal prompt that answers its opener through a callback (dialogs.py, the
routing screen's take dialog) is pushed by that opener, not named here.

Modules are imported when their screen first opens, so starting the app reads none of them.
"""

from __future__ import annotations

from typing import NamedTuple


class ScreenEntry(NamedTuple):
    module: str  # under screens/
    cls: str
    # Installed once and kept for the app's life, so what it holds survives going back to the grid.
    kept: bool = False
    # Opens only with donors open; `refusal` is what the user is told otherwise (None: nothing).
    needs_donors: bool = False
    refusal: str | None = None


SCREENS: dict[str, ScreenEntry] = {
    "donors": ScreenEntry("donors", "DonorsScreen"),
    "layer": ScreenEntry("layer", "LayerScreen"),
    "help": ScreenEntry("help", "HelpScreen"),
    "mix": ScreenEntry("mix", "MixScreen"),
    "export": ScreenEntry("export", "ExportScreen", needs_donors=True, refusal="nothing to export"),
    "distance_map": ScreenEntry("distance_map", "DistanceMapScreen", needs_donors=True),
    # The picked probes and the shown results stay; the live hybrid itself is the app's (app.hybrids).
    "probes": ScreenEntry("probes", "ProbesScreen", kept=True, needs_donors=True, refusal="nothing to probe"),
    # The form and the shown sweep stay.
    "sweep": ScreenEntry("sweep", "SweepScreen", kept=True, needs_donors=True, refusal="nothing to sweep"),
    # Routing measured for a donor stays.
    "routing": ScreenEntry("heatmap", "RoutingScreen", kept=True, needs_donors=True, refusal="nothing to analyse"),
    # Pruning or merging the donor the Routing screen shows, from the routing it measured.
    "prune": ScreenEntry("prune", "PruneScreen", needs_donors=True),
    # A plan's gate selection stays while the marks do.
    "gates": ScreenEntry("gates", "GatesScreen", kept=True, needs_donors=True, refusal="no layer gates to select"),
}


def screen_class(name: str) -> type:
    from importlib import import_module

    entry = SCREENS[name]
    return getattr(import_module(f"{__package__}.{entry.module}"), entry.cls)
