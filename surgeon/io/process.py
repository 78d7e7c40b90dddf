"""Is a process still running? Leftover files carry their writer's pid, and a live writer's
files must not be cleaned up from under it."""

import os


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True
