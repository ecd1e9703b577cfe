"""Prometheus metrics of one Isthmus instance (its own registry: no global state)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class Metrics:
    """Every counter, gauge and histogram Isthmus exports at ``/metrics``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.frames_received = Counter(
            "isthmus_frames_received", "Frames received from devices, by source.", ["source"], registry=r
        )
        self.frames_rejected = Counter(
            "isthmus_frames_rejected",
            "Frames refused before journaling (unknown token, too large), by source and reason.",
            ["source", "reason"],
            registry=r,
        )
        self.frames_journaled = Counter(
            "isthmus_frames_journaled", "Frames durably journaled, by source.", ["source"], registry=r
        )
        self.frames_decoded = Counter(
            "isthmus_frames_decoded", "Frames decoded into messages, by source.", ["source"], registry=r
        )
        self.frames_failed = Counter(
            "isthmus_frames_failed",
            "Frames journaled with a decode error or quarantined, by source and status.",
            ["source", "status"],
            registry=r,
        )
        self.deliveries = Counter("isthmus_sink_delivered", "Records delivered, by sink.", ["sink"], registry=r)
        self.skipped = Counter(
            "isthmus_sink_skipped", "Records a sink's route did not select, by sink.", ["sink"], registry=r
        )
        self.retries = Counter("isthmus_sink_retries", "Write retries, by sink.", ["sink"], registry=r)
        self.dead_letters = Counter(
            "isthmus_sink_dead_lettered", "Records dead-lettered, by sink.", ["sink"], registry=r
        )
        self.journal_lag = Gauge(
            "isthmus_journal_lag", "Records in the journal a consumer has not handled yet.", ["consumer"], registry=r
        )
        self.sink_state = Gauge(
            "isthmus_sink_state", "Sink health: 0 healthy, 1 retrying, 2 failing.", ["sink"], registry=r
        )
        self.commit_latency = Histogram(
            "isthmus_journal_commit_seconds",
            "Duration of one journal group commit.",
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0),
            registry=r,
        )
        self.commit_records = Histogram(
            "isthmus_journal_commit_records",
            "Records per journal group commit.",
            buckets=(1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000),
            registry=r,
        )

    def on_commit(self, records: int, seconds: float) -> None:
        """Journal callback: one group commit of ``records`` took ``seconds``."""
        self.commit_latency.observe(seconds)
        self.commit_records.observe(records)
