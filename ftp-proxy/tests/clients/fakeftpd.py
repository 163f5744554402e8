#!/usr/bin/env python3
"""A minimal FTP server for load tests of the gateway: many sessions, little
work. Greets, accepts any login, answers NOOP/PWD/QUIT, refuses the rest.

Usage: fakeftpd.py HOST PORT
"""
import asyncio
import resource
import sys


async def session(reader, writer):
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
