"""TCP and shm transports: real transfers between OS processes, and every failure as data."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import torch
from nacl.signing import SigningKey

from meshd.kv_transfer import shm as shm_mod
from meshd.kv_transfer.auth import Authenticator, Ed25519Authenticator, SharedSecretAuthenticator
from meshd.kv_transfer.layout import BlockLayout
from meshd.kv_transfer.testing import DictSource, make_kv, run_server_process
from meshd.kv_transfer.transport import (
    ErrorCode,
    Peer,
    TransportServer,
    make_client,
    make_server,
)

LAYOUT = BlockLayout(num_layers=3, num_kv_heads=2, head_dim=64, dtype="bfloat16", block_size=16)
NUM_BLOCKS = 64
SEED = 7
SECRET = b"mesh-secret-0123456789abcdef"
# Large enough for several 64 KiB chunks: 12 blocks x 24 KiB.
HELD = {"req-a": [5, 6, 7, 8, 20, 21, 2, 40, 41, 42, 43, 60]}
LOCAL = [0, 1, 2, 3, 4, 30, 31, 32, 9, 10, 50, 63]
CHUNK = 64 << 10


def make_ed_pair() -> tuple[Authenticator, Authenticator]:
    s, c = SigningKey.generate(), SigningKey.generate()
    return (Ed25519Authenticator(s, [bytes(c.verify_key)]),
            Ed25519Authenticator(c, [bytes(s.verify_key)]))


def assert_copied(src: list[torch.Tensor], dst: list[torch.Tensor],
                  remote: list[int], local: list[int]) -> None:
    for layer in range(LAYOUT.num_layers):
        for r, lo in zip(remote, local, strict=True):
            assert torch.equal(src[layer][:, r].view(torch.int16),
                               dst[layer][:, lo].view(torch.int16))


# --- two real processes -----------------------------------------------------------------------


@pytest.fixture(scope="module", params=["tcp", "shm"])
def remote_server(request: pytest.FixtureRequest) -> Iterator[tuple[str, Peer, Any, bytes]]:
    """A server in a spawned process; yields (transport, address, on_sent queue, client seed)."""
    ctx = mp.get_context("spawn")
    server_seed, client_seed = b"s" * 32, b"c" * 32
    client_pub = bytes(SigningKey(client_seed).verify_key)
    ready, events, stop = ctx.Queue(), ctx.Queue(), ctx.Event()
    proc = ctx.Process(target=run_server_process, args=(
        request.param, LAYOUT.to_dict(), NUM_BLOCKS, SEED, ("ed25519", server_seed, [client_pub]),
        HELD, ready, events, stop), daemon=True)
    proc.start()
    port = ready.get(timeout=60)
    yield request.param, Peer("127.0.0.1", port), events, server_seed
    stop.set()
    proc.join(10)


def test_cross_process_transfer_is_bit_exact(remote_server: tuple[str, Peer, Any, bytes]) -> None:
    name, peer, events, server_seed = remote_server
    auth = Ed25519Authenticator(SigningKey(b"c" * 32), [bytes(SigningKey(server_seed).verify_key)])
    dst = make_kv(LAYOUT, NUM_BLOCKS, None)
    client = make_client(name, dst, LAYOUT, auth, chunk_bytes=CHUNK)
    result = client.fetch(peer, "req-a", HELD["req-a"], LOCAL, timeout_s=20)
    assert result.ok, result.error
    assert result.bytes == len(LOCAL) * LAYOUT.bytes_per_block
    assert_copied(make_kv(LAYOUT, NUM_BLOCKS, SEED), dst, HELD["req-a"], LOCAL)
    untouched = [b for b in range(NUM_BLOCKS) if b not in LOCAL]
    assert all(int(t[:, untouched].count_nonzero()) == 0 for t in dst)
    assert events.get(timeout=10) == "req-a"
    # Released after the read: a second fetch finds nothing.
    again = client.fetch(peer, "req-a", HELD["req-a"], LOCAL, timeout_s=20)
    assert again.error is not None and again.error.code is ErrorCode.UNKNOWN_REQUEST


# --- in-process servers for failure cases -------------------------------------------------------


@pytest.fixture(params=["tcp", "shm"])
def transport(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def make_pair(
    transport: str, server_auth: Authenticator, client_auth: Authenticator,
    client_layout: BlockLayout = LAYOUT,
) -> tuple[TransportServer, Any, DictSource, list[torch.Tensor], list[torch.Tensor]]:
    src, dst = make_kv(LAYOUT, NUM_BLOCKS, SEED), make_kv(client_layout, NUM_BLOCKS, None)
    source = DictSource(HELD)
    server = make_server(transport, src, LAYOUT, server_auth, source)
    client = make_client(transport, dst, client_layout, client_auth, chunk_bytes=CHUNK)
    return server, client, source, src, dst


def fetch_error(client: Any, peer: Peer, timeout_s: float = 5.0) -> tuple[ErrorCode, str]:
    result = client.fetch(peer, "req-a", HELD["req-a"], LOCAL, timeout_s=timeout_s)
    assert not result.ok and result.error is not None
    return result.error.code, result.error.message


def test_hmac_transfer_and_on_sent(transport: str) -> None:
    auth = SharedSecretAuthenticator(SECRET)
    server, client, source, src, dst = make_pair(transport, auth, auth)
    result = client.fetch(server.address, "req-a", HELD["req-a"], LOCAL, timeout_s=5)
    assert result.ok, result.error
    assert_copied(src, dst, HELD["req-a"], LOCAL)
    assert source.sent_event.wait(5) and source.sent == ["req-a"]
    server.close()


@pytest.mark.parametrize(
    ("case", "code", "fragment"),
    [
        ("bad_secret", ErrorCode.AUTH, "HMAC"),
        ("untrusted_key", ErrorCode.AUTH, "untrusted"),
        ("scheme", ErrorCode.AUTH, "scheme"),
        ("layout", ErrorCode.LAYOUT_MISMATCH, "head_dim: 32 != 64"),
    ],
)
def test_handshake_refusals(transport: str, case: str, code: ErrorCode, fragment: str) -> None:
    good = SharedSecretAuthenticator(SECRET)
    server_auth: Authenticator = good
    client_auth: Authenticator = good
    layout = LAYOUT
    if case == "bad_secret":
        client_auth = SharedSecretAuthenticator(b"wrong-secret-0123456789")
    elif case == "untrusted_key":
        server_auth, _ = make_ed_pair()
        _, client_auth = make_ed_pair()
    elif case == "scheme":
        _, client_auth = make_ed_pair()
    else:
        layout = BlockLayout(3, 2, 32, "bfloat16", 16)
    server, client, source, _, _ = make_pair(transport, server_auth, client_auth, layout)
    got_code, message = fetch_error(client, server.address)
    assert got_code is code and fragment in message, message
    assert source.sent == []
    server.close()


@pytest.mark.parametrize(
    ("request_id", "remote", "local", "code"),
    [
        ("nope", [1], [1], ErrorCode.UNKNOWN_REQUEST),
        ("req-a", [5, 9], [1, 2], ErrorCode.BAD_BLOCKS),  # 9 is not held for req-a
        ("req-a", [5, 6], [1], ErrorCode.BAD_BLOCKS),  # count mismatch (caught locally)
        ("req-a", [5], [NUM_BLOCKS], ErrorCode.BAD_BLOCKS),  # local id out of range
    ],
)
def test_bad_requests(
    transport: str, request_id: str, remote: list[int], local: list[int], code: ErrorCode
) -> None:
    auth = SharedSecretAuthenticator(SECRET)
    server, client, _, _, _ = make_pair(transport, auth, auth)
    result = client.fetch(server.address, request_id, remote, local, timeout_s=5)
    assert not result.ok and result.error is not None and result.error.code is code
    server.close()


def test_replayed_handshake_is_rejected() -> None:
    """Record a good client's bytes, then replay them on a fresh connection."""
    auth = SharedSecretAuthenticator(SECRET)
    server, client, _, _, _ = make_pair("tcp", auth, auth)
    proxy = FaultProxy(server.address)
    assert client.fetch(proxy.address, "req-a", HELD["req-a"], LOCAL, timeout_s=5).ok
    recorded = bytes(proxy.client_bytes)
    with socket.create_connection(server.address, timeout=5) as sock:
        sock.sendall(recorded)
        reply = read_until_error(sock)
    assert reply["code"] == "auth" and "HMAC" in reply["message"]
    proxy.close()
    server.close()


def read_until_error(sock: socket.socket) -> dict[str, Any]:
    """Read length-prefixed control frames until an error frame arrives."""
    buf = b""
    while True:
        while len(buf) < 4 or len(buf) < 4 + int.from_bytes(buf[:4], "big"):
            data = sock.recv(65536)
            assert data, "server closed without an error frame"
            buf += data
        n = int.from_bytes(buf[:4], "big")
        msg = msgpack.unpackb(buf[4 : 4 + n])
        buf = buf[4 + n :]
        if msg["t"] == "error":
            return dict(msg)


# --- faults on the wire -------------------------------------------------------------------------


class FaultProxy:
    """TCP proxy that can flip, cut or stall the server->client stream at a byte offset."""

    def __init__(self, target: Peer, mode: str = "pass", at: int = 0) -> None:
        self.target, self.mode, self.at = target, mode, at
        self.client_bytes = bytearray()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.address = Peer("127.0.0.1", self._sock.getsockname()[1])
        self._stop = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        conn, _ = self._sock.accept()
        up = socket.create_connection(self.target)
        threading.Thread(target=self._pump, args=(conn, up, self._c2s), daemon=True).start()
        self._pump(up, conn, self._s2c)

    def _c2s(self, data: bytes, offset: int) -> bytes | None:
        self.client_bytes += data
        return data

    def _s2c(self, data: bytes, offset: int) -> bytes | None:
        end = offset + len(data)
        if self.mode == "pass" or end <= self.at:
            return data
        cut = self.at - offset
        if self.mode == "flip":
            self.mode = "pass"
            return data[:cut] + bytes([data[cut] ^ 0x40]) + data[cut + 1 :]
        if self.mode == "cut":
            return None
        self._stop.wait(30)  # stall
        return None

    def _pump(self, a: socket.socket, b: socket.socket,
              hook: Callable[[bytes, int], bytes | None]) -> None:
        offset = 0
        try:
            while data := a.recv(65536):
                out = hook(data, offset)
                offset += len(data)
                if out is None:
                    if self.mode == "cut" and self.at > offset - len(data):
                        b.sendall(data[: self.at - (offset - len(data))])
                    break
                b.sendall(out)
        except OSError:
            pass
        finally:
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self._stop.set()
        self._sock.close()


PAYLOAD = len(LOCAL) * LAYOUT.bytes_per_block


@pytest.mark.parametrize(
    ("mode", "code"),
    [("flip", ErrorCode.CORRUPT), ("cut", ErrorCode.TRUNCATED), ("stall", ErrorCode.TIMEOUT)],
)
def test_tcp_stream_faults(mode: str, code: ErrorCode) -> None:
    auth = SharedSecretAuthenticator(SECRET)
    server, client, source, _, _ = make_pair("tcp", auth, auth)
    proxy = FaultProxy(server.address, mode, at=PAYLOAD // 2)  # inside a chunk's payload
    start = time.monotonic()
    got, message = fetch_error(client, proxy.address, timeout_s=1.5)
    assert got is code, message
    assert time.monotonic() - start < 3.0
    assert source.sent == []
    proxy.close()
    server.close()


def test_shm_detects_corrupted_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something scribbles on the staging slot between the server's write and our read."""
    real = shm_mod.ShmClient._read_slot

    def corrupt(seg: Any, offset: int, pieces: list[memoryview]) -> None:
        seg.buf[offset + 100] ^= 0xFF
        real(seg, offset, pieces)

    monkeypatch.setattr(shm_mod.ShmClient, "_read_slot", staticmethod(corrupt))
    auth = SharedSecretAuthenticator(SECRET)
    server, client, source, _, _ = make_pair("shm", auth, auth)
    got, message = fetch_error(client, server.address)
    assert got is ErrorCode.CORRUPT and "chunk 0" in message
    assert source.sent == []
    server.close()


def test_shm_stalled_server_times_out() -> None:
    auth = SharedSecretAuthenticator(SECRET)
    server, client, _, _, _ = make_pair("shm", auth, auth)
    proxy = FaultProxy(server.address, "stall", at=300)  # just past the handshake
    start = time.monotonic()
    got, _ = fetch_error(client, proxy.address, timeout_s=1.0)
    assert got is ErrorCode.TIMEOUT and time.monotonic() - start < 2.5
    proxy.close()
    server.close()


def test_connect_refused_and_unknown_transport() -> None:
    auth = SharedSecretAuthenticator(SECRET)
    client = make_client("tcp", make_kv(LAYOUT, 4, None), LAYOUT, auth)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = client.fetch(Peer("127.0.0.1", port), "r", [0], [0], timeout_s=2)
    assert result.error is not None and result.error.code is ErrorCode.CONNECT
    with pytest.raises(ValueError, match="valid: cuda_ipc, nccl, shm, tcp"):
        make_client("rdma", [], LAYOUT, auth)
