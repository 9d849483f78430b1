"""Checks of the paths a command will write, made before it does any work
(a bad output path used to fail after a whole run, losing its result)."""

from __future__ import annotations

import os


def output_file_problem(path: str | os.PathLike) -> str | None:
    """Why a file cannot be written at ``path`` (a directory there, a missing
    or unwritable folder), or None."""
    if os.path.isdir(path):
        return "is a directory; give a file name"
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        return f"the folder {folder!r} does not exist"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"the folder {folder!r} is not writable"
    return None
