"""A guest that answers instantly: no process per command, canned results, many connections.

``python -m benchmarks._guest --connect PATH|vsock://CID:PORT [--connections N] [--bulk-bytes N]``

It dials the host's Unix socket (the way an agent dials the host), or inside the VM tier's
guest only, the host's vsock port, and
answers every v1 command frame at once: ``:`` (and ``: ...``, so a v2 hello gets a v1
shell's answer) with the empty exit-0 probe answer, ``bulk`` with ``--bulk-bytes`` bytes
of stdout, anything else with ``ok\\n``. One connection is served with a plain blocking
loop, many with one ``selectors`` loop, so one process can stand in for hundreds of guests.
AF_VSOCK only where ``VSOCK_ASYNC_FORBID_VSOCK_CONNECT`` is unset, which is inside the
VM tier's guest alone (``benchmarks._harness`` sets it everywhere else).
"""

from __future__ import annotations

import argparse
import os
import selectors
import socket
import struct
import sys
import time

_U32 = struct.Struct(">I")
PROBE_ANSWER = b"\0\0\0\0\0\0\0\0\0"
OK_ANSWER = _U32.pack(3) + b"ok\n" + _U32.pack(0) + b"\0"


def _dial(target: str) -> socket.socket:
    family: int = socket.AF_UNIX
    address: str | tuple[int, int] = target
    if target.startswith("vsock://"):
        if os.environ.get("VSOCK_ASYNC_FORBID_VSOCK_CONNECT"):
            raise SystemExit("guest: refusing to connect AF_VSOCK here (the guard is set)")
        cid, port = target.removeprefix("vsock://").split(":")
        family, address = socket.AF_VSOCK, (int(cid), int(port))
    for _ in range(500):
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.connect(address)
            return sock
        except (FileNotFoundError, ConnectionRefusedError, ConnectionResetError):
            sock.close()
            time.sleep(0.02)
    raise SystemExit(f"guest: nothing listens on {target}")


def _commands(buf: bytearray) -> list[bytes]:
    """Take every complete command out of ``buf``, in order."""
    out = []
    while len(buf) >= 4:
        (n,) = _U32.unpack_from(buf)
        if len(buf) < 4 + n:
            break
        out.append(bytes(buf[4 : 4 + n]))
        del buf[: 4 + n]
    return out


def _answer(command: bytes) -> bytes:
    # ":" and ": ...": a shell's no-op, which is also how a v1 guest answers a v2 hello
    return PROBE_ANSWER if command == b":" or command.startswith(b": ") else OK_ANSWER


# Whole frames a benchmark sends, answered without parsing: the guests share the machine's
# two cores with the server under test, so the less CPU they use the more the server shows.
CANNED = {b"\0\0\0\x01:": PROBE_ANSWER, b"\0\0\0\x04echo": OK_ANSWER}


def serve_one(sock: socket.socket, bulk: bytes) -> None:
    """Answer on one blocking connection until the host closes it."""
    bulk_head = _U32.pack(len(bulk))
    bulk_tail = _U32.pack(0) + b"\0"
    buf = bytearray()
    while True:
        data = sock.recv(65536)
        if not data:
            return
        buf += data
        for command in _commands(buf):
            if command == b"bulk":
                sock.sendall(bulk_head)
                sock.sendall(bulk)
                sock.sendall(bulk_tail)
            else:
                sock.sendall(_answer(command))


def _send(sock: socket.socket, answer: bytes) -> None:
    """Send a small answer on a non-blocking socket: one send, blocking only if it fell short."""
    sent = sock.send(answer)
    if sent < len(answer):
        sock.setblocking(True)
        sock.sendall(answer[sent:])
        sock.setblocking(False)


def serve_many(socks: list[socket.socket]) -> None:
    """Answer on many connections from one selector loop until all are closed."""
    sel = selectors.DefaultSelector()
    bufs: dict[socket.socket, bytearray] = {}
    for sock in socks:
        sock.setblocking(False)
        sel.register(sock, selectors.EVENT_READ)
        bufs[sock] = bytearray()
    while bufs:
        for key, _ in sel.select():
            assert isinstance(key.fileobj, socket.socket)
            sock = key.fileobj
            try:
                data = sock.recv(65536)
            except (BlockingIOError, InterruptedError):
                continue
            except OSError:
                data = b""
            if not data:
                sel.unregister(sock)
                sock.close()
                del bufs[sock]
                continue
            buf = bufs[sock]
            if not buf and data in CANNED:
                _send(sock, CANNED[data])
                continue
            buf += data
            commands = _commands(buf)
            if commands:
                _send(sock, b"".join(map(_answer, commands)))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "--connect", required=True, help="the host's Unix socket path, or vsock://CID:PORT"
    )
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--bulk-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    bulk = bytes(range(256)) * (args.bulk_bytes // 256) + bytes(args.bulk_bytes % 256)
    socks = [_dial(args.connect) for _ in range(args.connections)]
    try:
        if len(socks) == 1:
            serve_one(socks[0], bulk)
        else:
            serve_many(socks)
    except (BrokenPipeError, ConnectionResetError):
        pass
    sys.exit(0)


if __name__ == "__main__":
    main()
