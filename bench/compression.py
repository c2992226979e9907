"""What compressed provider responses cost each way of reading them (issue 26, docs/streaming.md).

Over the recorded exchanges in ../shared/provider-recordings, sent as providers send them (JSON compressed whole,
SSE in 5 chunks with a flush per chunk, as tests/replay_upstream.py does):

- bytes on the provider's wire per encoding against identity: what stripping accept-encoding on the provider
  routes would cost in egress;
- the server's CPU to decode its copy (apis/content_encoding.py), per response and per SSE chunk, next to the
  ~120 µs grpc.aio floor a chunk's ext_proc message already costs (../shared/NOTES.md).

Envoy's decompressor filters are not measured: ahead of ext_proc's response processing they never complete a
response in Envoy 1.40 (docs/streaming.md has the trace).

    python bench/compression.py [--json]
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nexus_dev.fakes.compress import stream_encoder  # noqa: E402
from nexus_extproc.apis.content_encoding import decoder_for  # noqa: E402
from tests.corpus import SKIP_REASON, load_cases  # noqa: E402

ENCODINGS = ("gzip", "br", "zstd")
CHUNKS = 5
REPEAT = 20


def pieces(case: dict[str, Any]) -> list[bytes]:
    raw = case["response_body"].encode()
    if "event-stream" not in case["response_content_type"]:
        return [raw]
    step = max(1, len(raw) // CHUNKS + 1)
    return [raw[i:i + step] for i in range(0, len(raw), step)]


def encode(encoding: str, parts: list[bytes]) -> list[bytes]:
    step, finish = stream_encoder(encoding)
    out = [step(p) for p in parts]
    out[-1] += finish()
    return out


def main() -> dict[str, Any]:
    cases = load_cases()
    if not cases:
        print(SKIP_REASON)
        return {}
    plain = sum(len(case["response_body"].encode()) for case in cases)
    result: dict[str, Any] = {"cases": len(cases), "identity_bytes": plain, "encodings": {}}
    for enc in ENCODINGS:
        wire = 0
        per_response: list[float] = []
        chunks = 0
        total_s = 0.0
        for case in cases:
            parts = pieces(case)
            coded = encode(enc, parts)
            wire += sum(len(c) for c in coded)
            t0 = time.perf_counter()
            for _ in range(REPEAT):
                d = decoder_for(enc)
                assert d is not None
                out = b"".join(d.feed(c) for c in coded)
            dt = (time.perf_counter() - t0) / REPEAT
            assert out == b"".join(parts), (enc, case["name"])
            per_response.append(dt * 1e6)
            chunks += len(coded)
            total_s += dt
        result["encodings"][enc] = {
            "wire_bytes": wire, "ratio_vs_identity": round(wire / plain, 3),
            "decode_us_per_response_median": round(statistics.median(per_response), 1),
            "decode_us_per_response_p95": round(sorted(per_response)[int(len(per_response) * 0.95)], 1),
            "decode_us_per_chunk_mean": round(total_s / chunks * 1e6, 1),
        }
    return result


if __name__ == "__main__":
    res = main()
    if "--json" in sys.argv:
        print(json.dumps(res, indent=2))
    elif res:
        print(f"{res['cases']} recorded responses, {res['identity_bytes']:,} bytes uncompressed")
        print(f"{'encoding':8} {'wire bytes':>11} {'vs identity':>11} {'decode µs/resp (median, p95)':>30} "
              f"{'µs/chunk':>9}")
        for enc, r in res["encodings"].items():
            print(f"{enc:8} {r['wire_bytes']:>11,} {r['ratio_vs_identity']:>11} "
                  f"{r['decode_us_per_response_median']:>18} {r['decode_us_per_response_p95']:>10} "
                  f"{r['decode_us_per_chunk_mean']:>9}")
