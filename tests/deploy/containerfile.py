"""deploy/Containerfile read as a builder reads it: its instructions, and the final stage's."""

from __future__ import annotations

import json

from tests.deploy.serve_options import DEPLOY

CONTAINERFILE = DEPLOY / "Containerfile"

Instruction = tuple[str, str]


def instructions() -> list[Instruction]:
    """Each instruction and its arguments, comment lines dropped, continued lines joined."""
    found: list[Instruction] = []
    logical = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if line.lstrip().startswith("#") or (not logical and not line.strip()):
            continue
        if line.rstrip().endswith("\\"):
            logical += line.rstrip()[:-1] + " "
            continue
        logical += line
        keyword, _, arguments = logical.strip().partition(" ")
        found.append((keyword.upper(), arguments.strip()))
        logical = ""
    return found


def final_stage() -> list[Instruction]:
    """The instructions of the image that is built: those after the last FROM."""
    every = instructions()
    last = max(i for i, (keyword, _) in enumerate(every) if keyword == "FROM")
    return every[last + 1 :]


def exec_form(arguments: str) -> list[str]:
    """A JSON-array (exec form) argument list; fails on the shell form, which would run the
    daemon under ``sh -c``, where SIGTERM never reaches it."""
    assert arguments.startswith("["), f"not the exec form: {arguments}"
    words = json.loads(arguments)
    assert isinstance(words, list) and all(isinstance(w, str) for w in words), arguments
    return words


def only(stage: list[Instruction], keyword: str) -> str:
    """The arguments of ``keyword``, which the stage gives once."""
    (arguments,) = [a for k, a in stage if k == keyword]
    return arguments


def entrypoint() -> list[str]:
    """The final image's ENTRYPOINT."""
    return exec_form(only(final_stage(), "ENTRYPOINT"))


__all__ = ["CONTAINERFILE", "entrypoint", "exec_form", "final_stage", "instructions", "only"]
