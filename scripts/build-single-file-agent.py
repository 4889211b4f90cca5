#!/usr/bin/env python3
"""Write the guest agent as one self-contained Python file, to copy into a guest image.

    python3 scripts/build-single-file-agent.py vsock-async-agent.py
    # in the guest:
    python3 vsock-async-agent.py --connect vsock://host:1024

The file is the package's own modules that the agent uses, concatenated in
dependency order with their relative imports removed, and the ``agent``
subcommand's parser taken from ``vsock_async/cli.py``: the same code, no copy
to keep in step. It needs only the standard library. Its usage is
``vsock-async-agent [options]``: the ``agent`` parser on its own, no subcommand.

Every module shares the file's one namespace, so the build refuses a name bound
at the top level of two modules to different things (an import may repeat).
"""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "vsock_async"

# Dependency order: each module only uses names defined above it.
MODULES = (
    "errors",
    "timeouts",
    "results",
    "protocol/limits",
    "protocol/_body",
    "protocol/v1",
    "protocol/v2_frames",
    "protocol/hello",
    "protocol/v2_session",
    "addresses",
    "_sockets",
    "_logging",
    "_digest",
    "agent/runner",
    "agent/request",
    "agent/terminal",
    "agent/process",
    "agent/paths",
    "agent/files",
    "agent/signals",
    "agent/v2",
    "agent/agent",
)
CLI_NAMES = (
    "EXIT_OK",
    "EXIT_ERROR",
    "EXIT_USAGE",
    "EXIT_INTERRUPTED",
    "_size",
    "_timeout",
    "_add_agent_parser",
    "_run_agent",
)

MAIN = '''

def main(argv: list[str] | None = None) -> int:
    """The ``agent`` subcommand of ``vsock-async``, as a program of its own."""
    parser = _add_agent_parser(argparse.ArgumentParser().add_subparsers())
    parser.prog = "vsock-async-agent"
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
'''


def _strip(source: str, keep: tuple[str, ...] | None = None) -> str:
    """``source`` without its docstring, ``from __future__`` and relative imports.

    A relative import becomes ``pass`` (it may be the only statement of a
    block). With ``keep``, only the top-level functions and assignments of
    those names are kept.
    """
    tree = ast.parse(source)
    lines = source.splitlines()
    replace: dict[int, tuple[int, str]] = {}  # first line -> (last line, replacement)
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.level > 0 or node.module == "__future__"):
            assert node.end_lineno is not None
            indent = lines[node.lineno - 1][: node.col_offset]
            replace[node.lineno] = (node.end_lineno, f"{indent}pass")
    body = tree.body
    first = body[0]
    if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
        assert first.end_lineno is not None
        replace[first.lineno] = (first.end_lineno, "")
    if keep is not None:
        wanted = [n for n in body if _defined(n) & set(keep)]
        lines_kept: list[str] = []
        for node in wanted:
            assert node.end_lineno is not None
            lines_kept.extend(_apply(lines, replace, node.lineno, node.end_lineno))
            lines_kept.extend(["", ""])
        return "\n".join(lines_kept)
    return "\n".join(_apply(lines, replace, 1, len(lines)))


def _defined(node: ast.stmt) -> set[str]:
    """The names a top-level statement defines (imports excluded: they may repeat)."""
    if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
        return {node.name}
    targets = node.targets if isinstance(node, ast.Assign) else []
    if isinstance(node, ast.AnnAssign):
        targets = [node.target]
    return {t.id for t in targets if isinstance(t, ast.Name)}


def _imported(node: ast.stmt) -> dict[str, str]:
    """The names a top-level import binds, each with what it binds (``module.name``)."""
    if isinstance(node, ast.Import):
        return {(a.asname or a.name.split(".")[0]): a.name for a in node.names}
    if isinstance(node, ast.ImportFrom):
        return {(a.asname or a.name): f"{node.module}.{a.name}" for a in node.names}
    return {}


def _check_names(parts: dict[str, str]) -> None:
    """Refuse a name bound at the top level of two parts to different things: one would
    replace the other (``from types import FrameType`` would hide the protocol's)."""
    seen: dict[str, tuple[str, str]] = {}  # name -> (part, what it is bound to)
    for part, source in parts.items():
        for node in ast.parse(source).body:
            bound = _imported(node) or dict.fromkeys(_defined(node), f"{part} itself")
            for name, what in bound.items():
                earlier = seen.setdefault(name, (part, what))
                if earlier[1] != what and name != "__all__":
                    raise SystemExit(f"{name} is bound in both {earlier[0]} and {part}")


def _apply(
    lines: list[str], replace: dict[int, tuple[int, str]], start: int, end: int
) -> list[str]:
    out: list[str] = []
    number = start
    while number <= end:
        if number in replace:
            last, text = replace[number]
            if text:
                out.append(text)
            number = last + 1
            continue
        out.append(lines[number - 1])
        number += 1
    return out


def build() -> str:
    """The single-file agent's source."""
    parts = [
        "#!/usr/bin/env python3",
        '"""vsock_async guest agent, single-file form (generated by'
        ' scripts/build-single-file-agent.py; do not edit)."""',
        "",
        "from __future__ import annotations",
        "",
        "import argparse",
        "import sys",
    ]
    sources = {
        f"vsock_async/{name}.py": _strip((PACKAGE / f"{name}.py").read_text()) for name in MODULES
    }
    sources["vsock_async/cli.py"] = _strip((PACKAGE / "cli.py").read_text(), keep=CLI_NAMES)
    sources["main"] = MAIN
    _check_names(sources)
    for name, source in sources.items():
        parts.append(f"\n# ---- {name} " + "-" * 40)
        parts.append(source)
    source = "\n".join(parts)
    compile(source, "vsock-async-agent.py", "exec")
    return source


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", type=Path, help="where to write the agent file")
    args = parser.parse_args()
    args.output.write_text(build())
    args.output.chmod(0o755)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
