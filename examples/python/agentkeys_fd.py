#!/usr/bin/env python3
"""A managed runtime in Python: receive a credential from agentkeysd as a memfd_secret fd.

Only the standard library: socket.recvmsg for SCM_RIGHTS, os.fstat for the length (the page's
file size is the secret's length), mmap to read it (read() does not work on memfd_secret).

    AGENTKEYS_TOKEN=akt_... AGENTKEYS_SOCKET=/run/user/1000/agentkeys/agentkeysd.sock \
        python3 agentkeys_fd.py github
"""
import array
import fcntl
import json
import mmap
import os
import socket
import stat
import sys

MAX_MESSAGE = 64 * 1024
MAX_SECRET = 1 << 20
if not hasattr(fcntl, "F_SEAL_FUTURE_WRITE"):
    fcntl.F_SEAL_FUTURE_WRITE = 0x0010  # Linux 5.1; Python names it from 3.12 on


def call(sock, req_id, body):
    """Send one request, return (response body, received fds)."""
    sock.send(json.dumps({"v": 1, "id": req_id, "body": body}).encode())
    fds = array.array("i")
    data, ancdata, flags, _ = sock.recvmsg(MAX_MESSAGE, socket.CMSG_SPACE(4 * fds.itemsize),
                                           socket.MSG_CMSG_CLOEXEC)
    for level, kind, payload in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(payload[: len(payload) - (len(payload) % fds.itemsize)])
    if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
        for fd in fds:
            os.close(fd)
        raise RuntimeError("truncated answer from agentkeysd")
    body = json.loads(data)["body"]
    if body["kind"] == "error":
        for fd in fds:
            os.close(fd)
        raise RuntimeError(f"agentkeysd refused: {body['code']}: {body['message']}")
    return body, list(fds)


def with_credential(service, use):
    """Fetch `service` and call use(memoryview of the secret); unmap and close afterwards."""
    token = os.environ.get("AGENTKEYS_TOKEN")
    if token is None:
        with open(os.environ["AGENTKEYS_TOKEN_FILE"]) as f:
            token = f.read().strip()
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as sock:
        sock.connect(os.environ["AGENTKEYS_SOCKET"])
        call(sock, 1, {"kind": "hello", "token": token})
        del token
        body, fds = call(sock, 2, {"kind": "get_credential", "service": service})
    if body["delivery"] != "fd" or len(fds) != 1:
        raise RuntimeError("expected exactly one fd")
    fd = fds[0]
    try:
        # Check what arrived before mapping it: a regular memory file of a sane size, and, if
        # it is a memfd (the degraded fallback), one sealed against growing, shrinking and
        # writing. memfd_secret refuses F_GET_SEALS (EINVAL), which is fine.
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or not 0 < st.st_size <= MAX_SECRET:
            raise RuntimeError("the received fd is not a secret page")
        try:
            seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            need = fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW
            if seals & need != need or not seals & (fcntl.F_SEAL_WRITE | fcntl.F_SEAL_FUTURE_WRITE):
                raise RuntimeError("the received memfd is not sealed")
        except OSError:
            pass  # memfd_secret: no seals to check
        size = st.st_size
        if size != body["len"]:
            raise RuntimeError("page size does not match the announced length")
        with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as page:
            view = memoryview(page)
            try:
                return use(view)
            finally:
                view.release()
    finally:
        os.close(fd)


if __name__ == "__main__":
    # Demo: say how long it was, never the value. With AK_EXPECT_SHA256 set (tests), compare
    # the secret with an expected digest instead of printing anything derived from it.
    import hashlib
    import hmac
    expect = os.environ.get("AK_EXPECT_SHA256")
    if expect:
        ok = with_credential(sys.argv[1], lambda s: hmac.compare_digest(hashlib.sha256(s).hexdigest(), expect))
        print("match" if ok else "mismatch")
        sys.exit(0 if ok else 1)
    n = with_credential(sys.argv[1], lambda secret: len(secret))
    print(f"received {sys.argv[1]}: {n} bytes")
