"""Is a registered version servable? Load it exactly as the server does, in a fresh process, and ask it.

The promotion gate runs this before moving the ``champion`` alias (as TFX's InfraValidator does): a
version whose artifacts cannot be downloaded, whose graph cannot load, or whose answers are not a
distribution over its labels is never promoted, whatever its metrics say. A fresh process catches what
an in-process check cannot: a pickled class that no longer imports, a missing file in the registry copy.
The version is downloaded afresh into a temporary folder, never taken from a cache, and checked against
the files registered with it (``download_compressed_dir``): the check judges what the registry holds now.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServableResult:
    ok: bool
    detail: str
    seconds: float


def check_servable(
    *, tracking_uri: str, model_name: str, version: str, texts: list[str], timeout_s: float = 300.0
) -> ServableResult:
    """Run the check in a child process; never raises for a model problem, reports it instead."""
    started = time.perf_counter()
    command = [
        sys.executable, "-m", "langops.serving.infra_check",
        "--tracking-uri", tracking_uri, "--model-name", model_name, "--version", str(version),
    ]
    try:
        done = subprocess.run(
            command, input=json.dumps(texts), capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return ServableResult(False, f"no answer within {timeout_s:.0f} s", time.perf_counter() - started)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        return ServableResult(False, f"fresh process failed: {tail[0][:500]}", seconds)
    answer = json.loads(done.stdout.strip().splitlines()[-1])
    return ServableResult(True, f"loaded in a fresh process and answered {answer['answered']} texts", seconds)


def main(argv: list[str] | None = None) -> int:
    from langops.onnx_model import OnnxClassifier
    from langops.serving.app import check_smoke_prediction
    from langops.serving.registry import ModelSource

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tracking-uri", required=True)
    parser.add_argument("--model-name", required=True)
    parser.add_argument("--version", required=True)
    args = parser.parse_args(argv)
    texts = json.loads(sys.stdin.read() or "[]")

    with tempfile.TemporaryDirectory(prefix="langops-servable-") as download_dir:
        source = ModelSource(args.tracking_uri, args.model_name, cache_dir=Path(download_dir))
        classifier = OnnxClassifier.load(source.fetch(args.version))
        check_smoke_prediction(classifier)
        answers = classifier.predict(texts)
    if len(answers) != len(texts) or any(a["label"] not in classifier.labels for a in answers):
        raise SystemExit(f"answers do not match the {len(texts)} texts sent")
    print(json.dumps({"answered": len(answers)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
