"""Python's cyclic garbage collector: paused while a donor's tables are built, kept off what the
workbench keeps for good, and its full passes held for a pause in the typing.

Opening a donor, ordering its tensors or resolving a plan over it makes a few hundred thousand small
objects (DeepSeek-V3: 92,000 header entries, each a dict, a shape, a TensorInfo, a sort key, a
Source), none of which form cycles. Each burst of allocations sets the collector off, and its full
passes walk every object already alive, which then includes the donors opened before: a third of the
time `natural_key` takes over DeepSeek-V3's names, a tenth of opening it. Paused, the same work runs
at the speed of the allocations; the collector resumes afterwards with nothing lost, since reference
counting frees everything that is not a cycle.
"""

from __future__ import annotations

import gc
from contextlib import contextmanager


@contextmanager
def paused():
    """Pause the collector for the block. Nested or concurrent blocks are fine: only the block that
    found it running starts it again (another thread's block may then run with it on: slower, not wrong)."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            # Resumed as is, the collector would walk every object made meanwhile at the very next
            # allocation (they all count as young: 55 ms for one DeepSeek-V3 donor) and again when they
            # age. Frozen and unfrozen, they join the oldest generation unwalked and the count starts
            # over; full collections still see them, so nothing escapes collection. While the process
            # keeps what it has for good (keep_for_good), unfreezing would thaw that too, and freezing
            # alone would freeze whatever else is alive with the block's objects (an open screen,
            # whose cycles would then outlive it): the block's objects stay young and are walked once.
            if not _keeping:
                gc.freeze()
                gc.unfreeze()
            gc.enable()


_keeping = False


def keep_for_good() -> None:
    """Let every later collection skip the objects alive now (`gc.freeze`), until `let_go`: for the
    workbench, once it has opened its donors. What later `paused` blocks make is not frozen.

    A collection walks every tracked object, and the collector never stops tracking a tuple subclass:
    DeepSeek-V3's `TensorInfo`s and `Part`s are 200,000 NamedTuples a pair, so each full collection of
    the workbench took 80-100 ms, about every eighth key; frozen, they are not walked. Reference
    counting still frees a frozen object when its last reference goes, so a replaced workbench's
    tables go too (they hold no cycles); a cycle among frozen objects waits for `let_go`."""
    global _keeping
    _keeping = True
    gc.freeze()


def let_go() -> None:
    """Undo `keep_for_good` and `hold_full_collections`: frozen objects are collected as any others
    again, and full collections come when the collector decides (the app, as it ends)."""
    global _keeping, _held
    _keeping = False
    gc.unfreeze()
    if _held is not None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, _held)
        _held = None


_held: int | None = None  # the oldest generation's own threshold, while full collections wait for idle
# A held full collection runs even while keys come once the middle generation has been collected this
# many times the oldest generation's own threshold (10 by default) since the last full one.
_OVERDUE = 10


def hold_full_collections() -> None:
    """Leave full collections to `collect_held`, which the app calls when nobody is typing.

    The young generations are still collected as they fill (a millisecond or less), but a full
    collection walks every object made since `keep_for_good`: a layer screen's table of a DeepSeek-V3
    layer and the screens' caches, 13-35 ms (once 55 ms) that stopped the app wherever they fell, in
    5 or 6 of 40 marks. Held, none runs while keys come; the one that runs in the next pause carries
    more (36-178 ms measured), and a key pressed during it waits for it."""
    global _held
    young, middle, oldest = gc.get_threshold()
    if _held is None:
        _held = oldest
    gc.set_threshold(young, middle, 1 << 30)


def collect_held(idle: bool) -> bool:
    """Run the full collection held back since it was due, when `idle` (or long overdue anyway);
    whether it ran."""
    if _held is None:
        return False
    waiting = gc.get_count()[2]  # collections of the middle generation since the last full one
    if waiting > _held and (idle or waiting > _OVERDUE * _held):
        gc.collect()
        return True
    return False
