"""The one exception a user mistake raises.

The CLI prints its message as a single line and exits non-zero; the TUI shows it in a modal.
Messages name the file, tensor or field at fault, because that is what the user must fix.
"""


class SurgeonError(Exception):
    """A problem with the user's input (a path, a spec, a checkpoint, a session)."""
