#!/usr/bin/env python3
"""FTP client driver for the integration tests, built on Python's ftplib.

Usage: ftpdriver.py '<json>' where the JSON object is
  {"host": "127.0.0.1", "port": 2100, "timeout": 30, "steps": [...]}
Each step is an object with an "op"; the result of every step is printed as
one JSON line. A failing step prints {"error": "..."} and the driver goes on,
so the test decides what a failure means.

Data connections are set up by hand (not by ftplib's helpers) so that each
of PASV, EPSV, PORT and EPRT can be chosen on either address family.

FTPS: "tls": "explicit" (AUTH TLS after the banner) or "implicit" (TLS from
the first byte), with "cafile" to trust; the "prot_p" step protects data
connections, which then resume the control connection's TLS session (as
curl and lftp do; stock ftplib does not).
"""
import ftplib
import hashlib
import json
import socket
import ssl
import sys


class ImplicitFTP_TLS(ftplib.FTP_TLS):
    """ftplib has no implicit FTPS: the handshake before the banner."""

    def connect(self, host="", port=0, timeout=-999, source_address=None):
        self.host, self.port = host, port
        if timeout != -999:
            self.timeout = timeout
        self.sock = socket.create_connection((host, port), self.timeout, source_address=source_address)
        self.af = self.sock.family
        self.sock = self.context.wrap_socket(self.sock, server_hostname=host)
        self.file = self.sock.makefile("r", encoding=self.encoding)
        self.welcome = self.getresp()
        return self.welcome


def pattern(size, seed=0):
    """Deterministic content holding every byte value."""
    block = bytes(((i * 7 + (i >> 8) + seed) & 0xFF) for i in range(65536 * 4))
    full, rest = divmod(size, len(block))
    for _ in range(full):
        yield block
    if rest:
        yield block[:rest]


class Driver:
    def __init__(self, spec):
        self.spec = spec
        self.ftp = None
        self.bind = spec.get("bind")
        self.context = None
        self.protected = False
        self.reused = []

    def connect(self):
        timeout = self.spec.get("timeout", 30)
        tls = self.spec.get("tls")
        self.context = None
        self.protected = False
        if tls:
            self.context = ssl.create_default_context(cafile=self.spec.get("cafile"))
            cls = ImplicitFTP_TLS if tls == "implicit" else ftplib.FTP_TLS
            ftp = cls(context=self.context, timeout=timeout)
        else:
            ftp = ftplib.FTP(timeout=timeout)
        source = (self.bind, 0) if self.bind else None
        ftp.source_address = source
        welcome = ftp.connect(self.spec["host"], self.spec["port"], source_address=source)
        self.ftp = ftp
        result = {"reply": welcome}
        if tls == "explicit":
            result["auth"] = ftp.auth()
        return result

    def protect(self, conn):
        """TLS on a data connection, resuming the control connection's session."""
        if not self.protected:
            return conn
        wrapped = self.context.wrap_socket(conn, server_hostname=self.spec["host"], session=self.ftp.sock.session)
        self.reused.append(wrapped.session_reused)
        return wrapped

    def finish_data(self, conn):
        """The end of a protected data connection: close_notify both ways."""
        if isinstance(conn, ssl.SSLSocket):
            try:
                conn = conn.unwrap()
            except (OSError, ValueError):
                pass
        conn.close()

    def open_data(self, mode):
        """Returns (accept_or_socket, is_listener)."""
        ftp = self.ftp
        local_ip = ftp.sock.getsockname()[0]
        family = ftp.sock.family
        if mode == "pasv":
            resp = ftp.sendcmd("PASV")
            host, port = ftplib.parse227(resp)
            if self.spec.get("pasv_use_control_host"):
                host = self.spec["host"]
            return socket.create_connection((host, port), timeout=self.spec.get("timeout", 30)), False, resp
        if mode == "epsv":
            resp = ftp.sendcmd("EPSV")
            _, port = ftplib.parse229(resp, ftp.sock.getpeername())
            return socket.create_connection((self.spec["host"], port), timeout=self.spec.get("timeout", 30)), False, resp
        listen_ip = self.spec.get("listen_ip", local_ip)
        lsock = socket.socket(family, socket.SOCK_STREAM)
        lsock.bind((listen_ip, 0))
        lsock.listen(1)
        lsock.settimeout(self.spec.get("timeout", 30))
        port = lsock.getsockname()[1]
        named = self.spec.get("name_ip", listen_ip)
        if mode == "port":
            resp = ftp.sendcmd("PORT " + ",".join(named.split(".") + [str(port >> 8), str(port & 0xFF)]))
        else:
            proto = "2" if ":" in named else "1"
            resp = ftp.sendcmd("EPRT |%s|%s|%d|" % (proto, named, port))
        return lsock, True, resp

    def transfer(self, command, mode, upload=None, limit=None):
        conn, listening, setup = self.open_data(mode)
        ftp = self.ftp
        ftp.putcmd(command)
        first = ftp.getresp()
        if listening:
            lsock = conn
            conn, peer = lsock.accept()
            lsock.close()
            conn.settimeout(self.spec.get("timeout", 30))
        # RFC 4217: the FTP client is the TLS client, also in active mode;
        # the handshake follows the 150.
        if first.startswith("1"):
            conn = self.protect(conn)
        digest = hashlib.sha256()
        size = 0
        if upload is not None:
            for chunk in upload:
                conn.sendall(chunk)
                digest.update(chunk)
                size += len(chunk)
            if isinstance(conn, ssl.SSLSocket):
                # close_notify, then the peer's, then the plain socket's end.
                conn = conn.unwrap()
            conn.shutdown(socket.SHUT_WR)
            # Wait for the server's side to close before the final reply.
            while conn.recv(65536):
                pass
        else:
            while True:
                chunk = conn.recv(1 << 20)
                if not chunk:
                    break
                digest.update(chunk)
                size += len(chunk)
                if limit is not None and size >= limit:
                    return conn, {"setup": setup, "first": first, "size": size}
        self.finish_data(conn)
        final = ftp.getresp()
        result = {"setup": setup, "first": first, "final": final, "size": size, "sha256": digest.hexdigest()}
        if self.protected:
            result["reused"] = self.reused[-1] if self.reused else None
        return None, result

    def step(self, step):
        op = step["op"]
        ftp = self.ftp
        if op == "connect":
            return self.connect()
        if op == "prot_p":
            self.protected = True
            return {"reply": ftp.prot_p()}
        if op == "rest_retr":
            # REST, then RETR from that offset.
            ftp.sendcmd("REST %d" % step["offset"])
            _, r = self.transfer("RETR " + step["path"], step.get("mode", "pasv"))
            return r
        if op == "login":
            return {"reply": ftp.login(step.get("user", "anonymous"), step.get("password", "test@example.com"))}
        if op == "cmd":
            try:
                return {"reply": ftp.sendcmd(step["line"])}
            except ftplib.all_errors as e:
                return {"reply": str(e)}
        if op == "raw":
            # Send bytes as they are, then read one reply.
            ftp.sock.sendall(bytes.fromhex(step["hex"]))
            try:
                return {"reply": ftp.getmultiline()}
            except ftplib.all_errors as e:
                return {"error": str(e)}
        if op == "retr":
            _, r = self.transfer("RETR " + step["path"], step.get("mode", "pasv"))
            return r
        if op in ("stor", "appe", "stou"):
            verb = op.upper() + ((" " + step["path"]) if step.get("path") else "")
            _, r = self.transfer(verb, step.get("mode", "pasv"), upload=pattern(step["size"], step.get("seed", 0)))
            return r
        if op in ("list", "nlst", "mlsd"):
            verb = op.upper() + ((" " + step["path"]) if step.get("path") else "")
            conn, r = self.transfer(verb, step.get("mode", "pasv"))
            return r
        if op == "abort":
            # Start a download, read some of it, then ABOR as ftplib does
            # (Telnet IP and Synch, then ABOR), with the data connection open.
            conn, r = self.transfer("RETR " + step["path"], step.get("mode", "pasv"), limit=step.get("after", 1 << 20))
            if isinstance(ftp.sock, ssl.SSLSocket):
                # No urgent data under TLS: it would break the record stream.
                ftp.sock.sendall(b"ABOR\r\n")
            else:
                ftp.sock.sendall(b"\xff\xf4\xff", socket.MSG_OOB)
                ftp.sock.sendall(b"\xf2ABOR\r\n")
            if conn is not None:
                conn.close()
            replies = []
            for _ in range(step.get("replies", 2)):
                try:
                    replies.append(ftp.getline())
                except ftplib.all_errors as e:
                    replies.append("error: %s" % e)
            r["abort_replies"] = replies
            return r
        if op == "quit":
            try:
                return {"reply": ftp.quit()}
            except ftplib.all_errors as e:
                return {"error": str(e)}
        if op == "expect_setup_reply":
            # Only the reply to the data setup command, no transfer.
            try:
                return {"reply": ftp.sendcmd(step["line"])}
            except ftplib.all_errors as e:
                return {"reply": str(e)}
        raise ValueError("unknown op %r" % op)


def main():
    spec = json.loads(sys.argv[1])
    driver = Driver(spec)
    for step in spec["steps"]:
        try:
            result = driver.step(step)
        except Exception as e:  # report and go on: the test decides
            result = {"error": "%s: %s" % (type(e).__name__, e)}
        result["op"] = step["op"]
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
