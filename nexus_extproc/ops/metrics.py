"""Prometheus metrics (SPEC §7). Label values come from bounded sets only: `model` is a configured or
price-database model id, else `other`; no user, key or prompt data ever becomes a label.

With `--workers N` each process writes prometheus-client's multiprocess files and the admin endpoint
sums them; the budget gauges are read from the shared ledger at scrape time instead, so they are the
same whichever process answers.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

COST_BUCKETS = (0.00001, 0.0001, 0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0)
COUNT_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1)

requests_total = Counter("nexus_requests_total", "Requests by policy decision", ["decision"])
cost_per_request = Histogram("nexus_cost_per_request_usd", "Settled cost per request (USD)",
                             ["model", "backend_type"], buckets=COST_BUCKETS)
token_count_duration = Histogram("nexus_token_count_duration_seconds", "Prompt token counting time",
                                 buckets=COUNT_BUCKETS)
token_count_tier = Counter("nexus_token_count_tier_total", "Prompt counts by tier", ["tier", "model"])
budget_events = Counter("nexus_budget_events_total", "Budget events", ["event_type"])
settlements = Counter("nexus_settlements_total", "Settlements by source of the usage", ["source"])
unpriced_requests = Counter("nexus_unpriced_requests_total", "Requests for a model with no known price")
store_failures = Counter("nexus_store_failures_total", "Ledger store failures", ["operation"])
bad_requests = Counter("nexus_bad_requests_total", "Requests answered with a 4xx by the filter", ["reason"])
streams_active = Gauge("nexus_streams_active", "Open ext_proc streams", multiprocess_mode="livesum")
stream_errors = Counter("nexus_stream_errors_total", "ext_proc streams that ended in an error", ["phase"])
# Responses that reached the server still compressed (no Envoy decompressor for their encoding ahead of ext_proc):
# their usage cannot be read, so they settle from our own counts. `encoding` is gzip|deflate|br|zstd|other.
responses_undecoded = Counter("nexus_responses_undecoded_total",
                              "Responses the server saw still content-encoded (settled from its own counts)",
                              ["encoding"])
passthrough = Counter("nexus_passthrough_requests_total",
                      "Requests forwarded uncharged (free endpoints; unknown paths under server.unknown_paths=pass)",
                      ["endpoint"])
websocket_refused = Counter("nexus_websocket_upgrades_refused_total",
                            "WebSocket upgrades answered 426 (clients fall back to HTTP, which is metered)")
envoy_reports = Counter("nexus_envoy_reports_total",
                        "Responses settled from Envoy's access-log report, by outcome: settled, no_usage (a report "
                        "without final usage: settled at the estimate), unmatched (no request waits for it), "
                        "missing (none came in time: settled at the estimate), corrected (a "
                        "late one replaced that estimate), settled_elsewhere / released_elsewhere (a request another "
                        "process admitted, from its snapshot), elsewhere (none came here: another process had it)",
                        ["outcome"])
unauthenticated_streams = Counter("nexus_unauthenticated_streams_total",
                                  "ext_proc or access-log streams refused: no or a wrong Envoy token", ["service"])
sse_bad_events = Counter("nexus_sse_bad_events_total", "SSE data lines that were not JSON (skipped)")
# Learned provider-input ÷ our-count per model and tier (all shapes pooled); every replica reads the same shared
# sums, so the most recent value from any process is the value.
estimate_ratio = Gauge("nexus_estimate_ratio", "Provider input tokens per counted prompt token, learned",
                       ["model", "tier"], multiprocess_mode="mostrecent")
reaped = Counter("nexus_reaped_reservations_total",
                 "Expired reservations: charged at the estimate (forwarded, then its process died) or released",
                 ["outcome"])
retention_pruned = Counter("nexus_retention_pruned_total",
                           "Rows removed by the daily retention pass (settlements after their day's roll-up)",
                           ["kind"])
reaped_micros = Counter("nexus_reaped_charged_microdollars_total",
                        "Micro-dollars charged by the reaper at the estimate (no usage was ever seen)")
outbox_corrupt = Counter("nexus_outbox_corrupt_total", "Outbox lines that failed their checksum (moved aside)")
outbox_failures = Counter("nexus_outbox_write_failures_total", "Settlements the outbox could not write")
settlements_pending = Gauge("nexus_settlements_pending", "Settlements held in memory: neither the store nor the "
                            "outbox took them yet (retried every pass)", multiprocess_mode="livesum")
unmetered = Counter("nexus_unmetered_requests_total",
                    "Requests forwarded with store_failure=open while neither the store nor the outbox works")
# One pass of each background loop, by the seed's loop names (its PromQL asks for reconciler="BudgetReconciler").
reconciler_duration = Histogram("nexus_reconciler_duration_seconds", "Duration of one pass of a background loop",
                                ["reconciler"], buckets=(.001, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
RECONCILERS = ("BudgetReconciler", "SettingsReloader", "CalibrationSync", "EnvoyHealthPoller")
for _name in RECONCILERS:
    reconciler_duration.labels(_name)
reconciler_errors = Counter("nexus_reconciler_errors_total", "Reconciler steps that failed (the loop goes on)",
                            ["step"])
wal_checkpoints = Counter("nexus_wal_checkpoints_total", "SQLite WAL truncations (size bound or full disk)")
worker_restarts = Counter("nexus_worker_restarts_total", "Worker processes restarted by the parent")
worker_recycles = Counter("nexus_worker_recycles_total",
                          "Workers that left after server.max_streams_per_worker streams and were replaced")
