"""The completion service under load and past it, on loopback: real requests from real data.

The knowledge base and the requests come from the emoji corpus (``bench/emoji.py``; ``bench/real_data.py``'s
split): the KB is built with ``rag4dmc kb build`` and its defaults, the requests are the incomplete part's
rows, an image (a caption is generated) or a text (an image is generated), as JSON with base64 images.

Two phases, each against ``rag4dmc serve --kb KB`` started here (a process with its own local Ray):

1. **load**: the service's defaults; ``--clients`` concurrent clients (16) send requests back to back for
   ``--seconds`` (30). Reports requests/s, p50/p95/p99 latency and the answers by status. Target: no 5xx.
2. **overload**: one ingress replica holding ``--overload-ongoing`` requests (2) with ``--overload-queued``
   (2) more waiting, and ``--overload-clients`` (32) clients: most requests are refused. Reports how fast the
   refusals come and whether each carries ``Retry-After``; the clients wait the Retry-After before their next
   request, as a well-behaved client does (``--ignore-retry-after``: they flood). Targets: every answer is a 200 or a 503 with
   ``Retry-After``, and the slowest 503 comes within a second.

The clients are threads of this process and share the 2 cores with the service: the figures are those of
one small machine serving itself.

    python bench/serve_load.py                      # both phases, KB built under runs/serve_load (kept)
    python bench/serve_load.py --kb KB --clients 8 --seconds 10 --skip-overload
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.common import REPO, Target, report, wait_healthy  # noqa: E402

WORK = REPO / "runs" / "serve_load"
LOOPBACK = "127.0.0.1"
START_TIMEOUT_S = 900  # KB load and model warm-up of every deployment on 2 shared cores
REQUEST_TIMEOUT_S = 120  # the client's bound on one request (the service's own request_timeout_s is 60)
PERCENTILES = (50, 95, 99)


def _installed_niqe() -> bool:
    from rag4dmc.pipeline.setup_data import NiqeParamsMissing, niqe_params_path

    try:
        niqe_params_path(None)
        return True
    except NiqeParamsMissing:
        return False


def build_kb(work: Path) -> tuple[str, str]:
    """The emoji corpus's KB (built once, with the defaults) and the incomplete part's parquet file."""
    from bench.real_data import cli, write_corpus

    kb, incomplete = work / "kb", work / "corpus" / "incomplete" / "part-00000.parquet"
    if not (kb / "manifest.json").exists() or not incomplete.exists():
        paths = write_corpus(work / "corpus", limit=None, seed=0)
        cli("kb", "build", "--internal", paths["internal"], "--external", paths["external"], "--out", str(kb))
    return str(kb), str(incomplete)


def request_bodies(incomplete: str) -> list[dict]:
    """One JSON body per incomplete row: its image (base64) or its text, with its id."""
    table = pq.read_table(incomplete, columns=["id", "image", "text"]).to_pylist()
    bodies = []
    for row in table:
        if row["image"] is not None:
            bodies.append({"id": row["id"], "image": base64.b64encode(row["image"]).decode()})
        elif row["text"]:
            bodies.append({"id": row["id"], "text": row["text"]})
    if not bodies:
        raise SystemExit(f"{incomplete} has no incomplete rows to send")
    return bodies


class Server:
    """``rag4dmc serve`` in a process group of its own, ready once ``/healthz`` answers 200."""

    def __init__(self, kb: str, config: dict, log: Path):

        with socket.socket() as s:
            s.bind((LOOPBACK, 0))
            self.port = s.getsockname()[1]
        self.url = f"http://{LOOPBACK}:{self.port}"
        cfg_file = log.with_suffix(".yaml")
        cfg_file.write_text(json.dumps(config))  # YAML is a superset of JSON
        rag4dmc = str(Path(sys.executable).with_name("rag4dmc"))
        self.log = log
        with log.open("w") as out:
            self.proc = subprocess.Popen([rag4dmc, "serve", "--kb", kb, "--host", LOOPBACK, "--port", str(self.port),
                                          "--config", str(cfg_file)], stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True, env={**os.environ, "RAY_ENABLE_UV_RUN_RUNTIME_ENV": "0"})
        try:
            self.start_s = wait_healthy(self.proc, self.url, log, START_TIMEOUT_S)
        except (RuntimeError, TimeoutError) as exc:
            self.stop()
            raise SystemExit(f"rag4dmc serve did not start: {exc}") from None

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)  # the clean stop being benchmarked in the tests; bounded there
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def drive(url: str, bodies: list[dict], clients: int, seconds: float, honour_retry_after: bool = True) -> list[dict]:
    """``clients`` threads sending requests back to back for ``seconds`` (after a 503, waiting its Retry-After
    as a well-behaved client does, unless told not to); one record per answer."""
    import requests

    records: list[dict] = []
    lock = threading.Lock()
    stop_at = time.monotonic() + seconds

    def client(k: int) -> None:
        session = requests.Session()
        i = k
        while time.monotonic() < stop_at:
            body = {**bodies[i % len(bodies)], "id": f"c{k}-{i}"}
            t0 = time.monotonic()
            try:
                r = session.post(f"{url}/v1/complete", json=body, timeout=REQUEST_TIMEOUT_S)
                rec = {"status": r.status_code, "retry_after": r.headers.get("Retry-After"),
                       "modality": "image" if "image" in body else "text"}
            except requests.RequestException as exc:
                rec = {"status": 0, "retry_after": None, "error": type(exc).__name__,
                       "modality": "image" if "image" in body else "text"}
            rec["seconds"] = time.monotonic() - t0
            with lock:
                records.append(rec)
            i += clients
            if honour_retry_after and rec["status"] == 503 and rec["retry_after"]:
                time.sleep(min(float(rec["retry_after"]), max(0.0, stop_at - time.monotonic())))

    threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(seconds + REQUEST_TIMEOUT_S + 10)
    wall = time.monotonic() - t0
    for r in records:
        r["wall"] = wall
    return records


def summarize(phase: str, clients: int, records: list[dict]) -> dict:
    wall = records[0]["wall"] if records else float("nan")
    by_status = Counter(r["status"] for r in records)
    ok = [r["seconds"] for r in records if r["status"] == 200]
    row = {"phase": phase, "clients": clients, "requests": len(records), "wall s": round(wall, 1),
           "answered/s": round(len(ok) / wall, 2), "by status": dict(sorted(by_status.items())),
           "5xx": sum(n for s, n in by_status.items() if s >= 500), "no answer": by_status.get(0, 0)}
    for p in PERCENTILES:
        row[f"p{p} ms (200)"] = round(1e3 * float(np.percentile(ok, p)), 1) if ok else None
    refused = [r for r in records if r["status"] == 503]
    if refused:
        row["503 p50 ms"] = round(1e3 * float(np.percentile([r["seconds"] for r in refused], 50)), 1)
        row["503 p99 ms"] = round(1e3 * float(np.percentile([r["seconds"] for r in refused], 99)), 1)
        row["503 max ms"] = round(1e3 * max(r["seconds"] for r in refused), 1)
        row["503 with Retry-After"] = sum(1 for r in refused if r["retry_after"])
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kb", help="a KB to serve (default: the emoji corpus's, built under runs/serve_load)")
    ap.add_argument("--requests-from", help="parquet file of incomplete rows to send (default: the emoji split's)")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--overload-clients", type=int, default=32)
    ap.add_argument("--overload-seconds", type=float, default=15.0)
    ap.add_argument("--overload-ongoing", type=int, default=2, help="max_ongoing_requests of the overload phase")
    ap.add_argument("--overload-queued", type=int, default=2, help="max_queued_requests of the overload phase")
    ap.add_argument("--skip-overload", action="store_true")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--ignore-retry-after", action="store_true",
                    help="overload clients retry at once after a 503 (a flood) instead of waiting its Retry-After")
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    if args.kb:
        kb, incomplete = args.kb, args.requests_from
        if not incomplete:
            raise SystemExit("--kb needs --requests-from (a parquet file of incomplete rows: id, image, text)")
    else:
        print("building the emoji corpus's KB (once) under", WORK, flush=True)
        kb, incomplete = build_kb(WORK)
    bodies = request_bodies(incomplete)
    base = {"kb": kb} if _installed_niqe() else {"kb": kb, "selection": {"image_quality": "none"}}
    rows, targets, starts = [], [], {}

    if not args.skip_load:
        print(f"load: {args.clients} clients for {args.seconds:g} s, the service's defaults", flush=True)
        server = Server(kb, base, WORK / "serve-load.log")
        starts["load"] = server.start_s
        try:
            drive(server.url, bodies[:8], 2, 5.0)  # warm-up: first batches through every deployment
            load = summarize("load", args.clients, drive(server.url, bodies, args.clients, args.seconds))
        finally:
            server.stop()
        rows.append(load)
        targets += [Target(f"5xx at {args.clients} clients", load["5xx"], 0, at_least=False),
                    Target(f"requests without an answer at {args.clients} clients", load["no answer"], 0,
                           at_least=False)]

    if not args.skip_overload:
        print(f"overload: {args.overload_clients} clients against max_ongoing_requests={args.overload_ongoing}, "
              f"max_queued_requests={args.overload_queued}", flush=True)
        cfg = {**base, "max_ongoing_requests": args.overload_ongoing, "max_queued_requests": args.overload_queued,
               "resources": {"ingress": {"max_actors": 1}}}
        server = Server(kb, cfg, WORK / "serve-overload.log")
        starts["overload"] = server.start_s
        try:
            drive(server.url, bodies[:8], 2, 5.0)
            records = drive(server.url, bodies, args.overload_clients, args.overload_seconds,
                            honour_retry_after=not args.ignore_retry_after)
        finally:
            server.stop()
        over = summarize("overload (flood)" if args.ignore_retry_after else "overload", args.overload_clients,
                         records)
        rows.append(over)
        unexpected = sum(1 for r in records if not (r["status"] == 200 or (r["status"] == 503 and r["retry_after"])))
        targets += [Target("overload answers other than 200 or 503 with Retry-After", unexpected, 0, at_least=False),
                    Target("slowest 503 under overload", (over.get("503 max ms") or float("nan")) / 1e3, 1.0,
                           at_least=False, unit=" s")]

    columns = list(dict.fromkeys(k for r in rows for k in r))
    report("serve_load", {"rag4dmc serve on loopback (emoji corpus KB; JSON requests)": (rows, columns)},
           {"kb": kb, "requests": len(bodies), "image_quality": "niqe" if "selection" not in base else "none",
            "server_start_s": {k: round(v, 1) for k, v in starts.items()}}, targets)


if __name__ == "__main__":
    main()
