"""Prometheus metrics and structured logs for the services.

Each service owns a registry (no global state) and a collector that reads the service's own
counters at scrape time, so the hot loop pays nothing for metrics. ``serve_metrics`` exposes it
on ``http://HOST:PORT/metrics``; the same port answers liveness probes.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Callable, Iterable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector


class SnapshotCollector(Collector):
    """Turns a service's ``snapshot()`` dict into metric families on each scrape.

    The snapshot holds ``counters`` (name → int, or name → {label value: int}), ``gauges``
    (same shapes) and ``label`` names for the nested dicts.
    """

    def __init__(self, service: str, snapshot: Callable[[], dict]):
        self.service = service
        self.snapshot = snapshot

    def collect(self) -> Iterable[Metric]:
        snap = self.snapshot()
        for kind, family in (("counters", CounterMetricFamily), ("gauges", GaugeMetricFamily)):
            for name, value in snap.get(kind, {}).items():
                full = f"neuroarcade_{self.service}_{name}"
                if isinstance(value, dict):
                    label = snap.get("labels", {}).get(name, "key")
                    m = family(full, f"{self.service} {name.replace('_', ' ')} by {label}", labels=[label])
                    for k, v in value.items():
                        if v is not None:
                            m.add_metric([str(k)], float(v))
                else:
                    m = family(full, f"{self.service} {name.replace('_', ' ')}", value=float(value or 0))
                yield m


def snapshot_registry(service: str, snapshot: Callable[[], dict]) -> CollectorRegistry:
    """A registry holding one ``SnapshotCollector`` (for services that render /metrics themselves)."""
    registry = CollectorRegistry()
    registry.register(SnapshotCollector(service, snapshot))
    return registry


def serve_metrics(service: str, snapshot: Callable[[], dict], port: int, host: str = "127.0.0.1"):
    """Start the metrics HTTP server in a daemon thread; returns (server, thread)."""
    return start_http_server(port, addr=host, registry=snapshot_registry(service, snapshot))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, plus any ``extra=`` fields."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.time(), "level": record.levelname, "logger": record.name, "msg": record.getMessage()}
        out.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


def setup_logging(verbose: bool = False, json_logs: bool = False) -> None:
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if json_logs else logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO if verbose else logging.WARNING)
