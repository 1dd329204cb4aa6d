"""A TCP relay: one port reachable from other pods, forwarded to a server that listens on loopback.

    python -m r4b_core.assets.tcp_relay --listen 0.0.0.0:8333 --to 127.0.0.1:18333
    python -m r4b_core.assets.tcp_relay --check 127.0.0.1:18333     # exit 0 when it takes connections

Why: the Helm chart's dev object store runs SeaweedFS `weed mini`, which has one bind address for
all its servers. Besides S3 (which checks the keys) they are the master, volume, filer and admin
HTTP servers and their gRPC ports, which take requests without credentials: the filer reads and
writes every object, the S3 gRPC service replaces the S3 identities. So weed binds 127.0.0.1 only
and this relay, in a second container of the pod, makes the S3 port the one reachable from outside
(charts/r4b/templates/objectstore/deployment.yaml). Plain Python, no r4b imports: it starts in a
fraction of a second.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys


def _address(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r}: write HOST:PORT, e.g. 127.0.0.1:18333")
    return host, int(port)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1 << 16):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():   # pass a half-close on: the other direction may still be talking
        writer.write_eof()


async def _connection(client_reader, client_writer, upstream: tuple[str, int]) -> None:
    try:
        up_reader, up_writer = await asyncio.open_connection(*upstream)
    except OSError:
        client_writer.close()
        return
    pipes = [asyncio.ensure_future(_pipe(client_reader, up_writer)),
             asyncio.ensure_future(_pipe(up_reader, client_writer))]
    try:
        await asyncio.gather(*pipes)
    except OSError:
        pass              # a reset on either side ends both
    finally:
        for pipe in pipes:
            pipe.cancel()
        for writer in (up_writer, client_writer):
            writer.close()


async def relay(listen: tuple[str, int], upstream: tuple[str, int]) -> None:
    server = await asyncio.start_server(lambda r, w: _connection(r, w, upstream), *listen)
    print(f"relaying {listen[0]}:{listen[1]} -> {upstream[0]}:{upstream[1]}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tcp_relay", description=__doc__.splitlines()[0])
    p.add_argument("--listen", type=_address, help="HOST:PORT to accept connections on")
    p.add_argument("--to", type=_address, help="HOST:PORT to forward them to")
    p.add_argument("--check", type=_address, help="only test that HOST:PORT takes a connection (a probe)")
    args = p.parse_args(argv)
    if args.check:
        try:
            socket.create_connection(args.check, timeout=3).close()
        except OSError as exc:
            print(f"{args.check[0]}:{args.check[1]}: {exc}", file=sys.stderr)
            return 1
        return 0
    if not (args.listen and args.to):
        p.error("give --listen and --to, or --check")
    asyncio.run(relay(args.listen, args.to))
    return 0


if __name__ == "__main__":
    sys.exit(main())
