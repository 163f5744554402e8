#!/usr/bin/env python3
"""A minimal FTP server for load tests of the gateway: many sessions, little
work. Greets, accepts any login, answers NOOP/PWD/QUIT, refuses the rest.

With --proxy-protocol, each connection must start with a PROXY header (v1
or v2), and the client address it names is printed as "client IP PORT".

Usage: fakeftpd.py HOST PORT [--proxy-protocol]
"""
import asyncio
import ipaddress
import resource
import struct
import sys

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
PROXY = "--proxy-protocol" in sys.argv[3:]


async def read_proxy_header(reader):
    """The client (address, port) of a PROXY header; None for LOCAL."""
    first = await reader.readexactly(12)
    if first == V2_SIGNATURE:
        ver_cmd, family, length = struct.unpack("!BBH", await reader.readexactly(4))
        body = await reader.readexactly(length)
        if ver_cmd & 0x0F == 0:
            return None
        if family >> 4 == 1:
            src, _dst, sport, _dport = struct.unpack("!4s4sHH", body[:12])
        else:
            src, _dst, sport, _dport = struct.unpack("!16s16sHH", body[:36])
        return str(ipaddress.ip_address(src)), sport
    line = first + await reader.readuntil(b"\r\n")
    fields = line.decode().split()
    if fields[1] == "UNKNOWN":
        return None
    return fields[2], int(fields[4])


async def session(reader, writer):
    if PROXY:
        try:
            client = await read_proxy_header(reader)
        except (asyncio.IncompleteReadError, ValueError, IndexError, struct.error):
            print("bad header", flush=True)
            writer.close()
            return
        if client is None:
            print("local", flush=True)
        else:
            print(f"client {client[0]} {client[1]}", flush=True)
    writer.write(b"220 fake ready\r\n")
    try:
        while True:
            line = await reader.readline()
            if not line:
                break
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb == b"USER":
                writer.write(b"331 password please\r\n")
            elif verb == b"PASS":
                writer.write(b"230 logged in\r\n")
            elif verb == b"NOOP":
                writer.write(b"200 ok\r\n")
            elif verb == b"PWD":
                writer.write(b'257 "/" is the current directory\r\n')
            elif verb == b"QUIT":
                writer.write(b"221 bye\r\n")
                await writer.drain()
                break
            else:
                writer.write(b"502 not implemented\r\n")
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def main(host, port):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = await asyncio.start_server(session, host, port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
