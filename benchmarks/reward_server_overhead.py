"""Overhead of scoring through a reward server: images/s in-process vs through ``calibri reward serve``.

A cheap reward (default ``brightness``, the cheapest offline one: the worst case for the
overhead) scores the same canonical batch (default 16 images of 256×256, float32 N×3×H×W,
12.6 MB) in this process and through a server started as a separate process
(``calibri reward serve NAME --port 0``, and ``--unix-socket`` for the ``unix`` transport) with the
``remote`` reward as the client. Calls alternate between the two paths (so that load from other
processes hits both alike); after warm-up calls, the median time per batch over ``--repeats``
calls gives the throughput, and the overhead ratio is remote time / in-process time (target
≤ 1.2×). The scores must be identical (with ``--encoding uint8``: identical to the in-process
scores of the 8-bit rounded batch); the script checks it.

Where the remote time goes is taken from the server's own timings in each answer: reading and
decoding the request (its ``elapsed_ms`` minus ``score_ms``), scoring (``score_ms``), and
everything outside the server (client checks and encoding, HTTP headers, JSON, the answer). The
"copy floor" is a plain socket sending the same bytes to a thread and waiting for one byte back:
what moving the batch costs before any HTTP.

    python benchmarks/reward_server_overhead.py
    python benchmarks/reward_server_overhead.py --reward sharpness --repeats 60
    python benchmarks/reward_server_overhead.py --transport tcp --encoding uint8 --json overhead.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np

STARTUP_TIMEOUT_S = 60.0


def start_server(name: str, transport: str, workdir: str) -> tuple[subprocess.Popen, str]:
    """``calibri reward serve`` in a subprocess; returns it and its URL (read from its first line)."""
    where = ["--port", "0"] if transport == "tcp" else ["--unix-socket", os.path.join(workdir, f"{name}.sock")]
    env = dict(os.environ, CALIBRI_PLUGINS="")
    proc = subprocess.Popen([sys.executable, "-m", "calibri.core.cli", "reward", "serve", name, *where],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    found: list[str] = []
    reader = threading.Thread(target=lambda: found.append(proc.stdout.readline()), daemon=True)
    reader.start()
    reader.join(STARTUP_TIMEOUT_S)
    line = found[0] if found else ""
    if " at " not in line:
        proc.kill()
        raise SystemExit(f"the server did not start: {line.strip() or proc.stderr.read().strip()}")
    return proc, line.split(" at ", 1)[1].split()[0]


def stop_server(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def copy_floor_ms(data: memoryview, repeats: int) -> float:
    """Median ms to push ``data`` through a loopback TCP socket to a thread and get one byte back."""
    listener = socket.create_server(("127.0.0.1", 0))
    size = data.nbytes

    def sink() -> None:
        connection, _ = listener.accept()
        buffer = bytearray(size)
        view = memoryview(buffer)
        with connection:
            while True:
                got = 0
                while got < size:
                    n = connection.recv_into(view[got:])
                    if not n:
                        return
                    got += n
                connection.sendall(b"k")

    thread = threading.Thread(target=sink, daemon=True)
    thread.start()
    client = socket.create_connection(listener.getsockname())
    client.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    times = []
    for i in range(repeats + 3):
        start = time.perf_counter()
        client.sendall(data)
        client.recv(1)
        if i >= 3:
            times.append(time.perf_counter() - start)
    client.close()
    thread.join(5)
    listener.close()
    return statistics.median(times) * 1e3


def measure(name: str, transport: str, encoding: str, images, local, repeats: int, warmup: int,
            workdir: str) -> dict:
    import torch

    from calibri.rewards.remote import RemoteReward

    proc, url = start_server(name, transport, workdir)
    try:
        remote = RemoteReward(url, encoding=encoding, batch_size=images.shape[0], timeout=60)
        if encoding == "uint8":  # the server scores the 8-bit rounding of the batch
            expected = local((images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy())
        else:
            expected = local(images)
        got = remote(images)
        identical = bool(np.array_equal(expected, got, equal_nan=True))
        for _ in range(warmup):
            local(images), remote(images)
        local_times, remote_times, timings = [], [], []
        for _ in range(repeats):
            start = time.perf_counter()
            local(images)
            local_times.append(time.perf_counter() - start)
            start = time.perf_counter()
            remote(images)
            remote_times.append(time.perf_counter() - start)
            timings.append(remote.last_timing())
        remote.close()
    finally:
        stop_server(proc)
    n = images.shape[0]
    local_ms = statistics.median(local_times) * 1e3
    remote_ms = statistics.median(remote_times) * 1e3
    elapsed = statistics.median(t["elapsed_ms"] for t in timings)
    scoring = statistics.median(t["score_ms"] for t in timings)
    return {
        "transport": transport, "encoding": encoding, "url": url, "identical_scores": identical,
        "in_process_ms": local_ms, "remote_ms": remote_ms, "ratio": remote_ms / local_ms,
        "in_process_images_per_s": n / local_ms * 1e3, "remote_images_per_s": n / remote_ms * 1e3,
        "server_read_decode_ms": statistics.median(t["elapsed_ms"] - t["score_ms"] - t["queue_ms"] for t in timings),
        "server_score_ms": scoring, "outside_server_ms": statistics.median(
            r * 1e3 - t["elapsed_ms"] for r, t in zip(remote_times, timings)),
        "server_elapsed_ms": elapsed,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reward", default="brightness", help="registered reward name (default: brightness)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--transport", default="tcp,unix", help="comma-separated: tcp, unix (default: both)")
    parser.add_argument("--encoding", default="float32", choices=("float32", "uint8"))
    parser.add_argument("--json", dest="json_path", help="also write the results to this file")
    args = parser.parse_args(argv)

    import torch

    from calibri.rewards.combine import build_reward

    transports = [t.strip() for t in args.transport.split(",") if t.strip()]
    unknown = set(transports) - {"tcp", "unix"}
    if unknown or not transports:
        parser.error(f"--transport takes tcp and/or unix, got {args.transport!r}")
    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.random((args.batch, 3, args.size, args.size), dtype=np.float32))
    local = build_reward(args.reward)
    megabytes = images.numel() * images.element_size() / 1e6
    print(f"reward {args.reward!r}, {args.batch} images of {args.size}×{args.size} ({megabytes:.1f} MB as float32), "
          f"{args.encoding} encoding, median of {args.repeats} (after {args.warmup} warm-up); "
          f"python {platform.python_version()}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    floor = copy_floor_ms(memoryview(images.numpy().reshape(-1).view(np.uint8)), args.repeats)
    print(f"copy floor: {floor:.2f} ms to push the float32 batch through a loopback TCP socket")
    results = []
    with tempfile.TemporaryDirectory() as workdir:
        for transport in transports:
            result = measure(args.reward, transport, args.encoding, images, local, args.repeats, args.warmup,
                             workdir)
            results.append(result)
    print()
    print(f"{'path':<22}{'ms/batch':>10}{'images/s':>11}{'ratio':>8}   where the remote time goes (ms)")
    for r in results:
        if r is results[0]:
            print(f"{'in-process':<22}{r['in_process_ms']:>10.2f}{r['in_process_images_per_s']:>11.0f}{1.0:>8.2f}")
        label = f"server over {r['transport']}"
        print(f"{label:<22}{r['remote_ms']:>10.2f}{r['remote_images_per_s']:>11.0f}{r['ratio']:>8.2f}   "
              f"read+decode {r['server_read_decode_ms']:.2f}, score {r['server_score_ms']:.2f} "
              f"(in-process {r['in_process_ms']:.2f}), outside the server {r['outside_server_ms']:.2f}")
    print()
    for r in results:
        verdict = "within" if r["ratio"] <= 1.2 else "above"
        print(f"overhead ratio over {r['transport']}: {r['ratio']:.2f}× ({verdict} the 1.2× target); "
              f"scores identical to in-process: {'yes' if r['identical_scores'] else 'NO'}")
    if args.json_path:
        with open(args.json_path, "w") as handle:
            json.dump({"reward": args.reward, "batch": args.batch, "size": args.size, "repeats": args.repeats,
                       "copy_floor_ms": floor, "results": results}, handle, indent=2)
    return 0 if all(r["identical_scores"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
