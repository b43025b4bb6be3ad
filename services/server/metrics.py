"""Prometheus collectors shared by every service (one registry per app, so tests can run many apps)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from luna_stack.server.latency import StageTimes

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self, kind: str):
        self.registry = CollectorRegistry()
        labels = {"service": kind}
        self.requests = Counter(
            "luna_requests_total",
            "HTTP requests by route and outcome",
            ["route", "outcome", "code"],
            registry=self.registry,
        )
        self.request_seconds = Histogram(
            "luna_request_seconds",
            "HTTP request duration",
            ["route"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.queue_seconds = Histogram(
            "luna_queue_wait_seconds",
            "Time a request waited for its batch to start",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.compute_seconds = Histogram(
            "luna_compute_seconds",
            "Duration of one batched forward",
            ["op"],
            buckets=_LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_seconds = Histogram(
            "luna_request_stage_seconds",
            "Time a request spends in each stage of the path (server/latency.py)",
            ["stage"],
            buckets=(0.0001, 0.00025, 0.0005, *_LATENCY_BUCKETS),
            registry=self.registry,
        )
        self.stages = StageTimes()
        self.batch_rows = Histogram(
            "luna_batch_rows",
            "Rows per batched forward",
            ["op"],
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64),
            registry=self.registry,
        )
        self.transport = Counter(
            "luna_op_transport_total",
            "Operations by how their tensors travelled (http bytes or CUDA IPC buffers)",
            ["transport"],
            registry=self.registry,
        )
        self.graph_forwards = Counter(
            "luna_graph_forwards_total",
            "Forwards by path: a captured CUDA graph replayed, or eager with the reason (rows: above the "
            "largest bucket, shapes: graph_max_shapes reached, lora: stacks do not fit the bank, capture: "
            "capture failed)",
            ["op", "path", "reason"],
            registry=self.registry,
        )
        self.jobs = Counter("luna_jobs_total", "Queued jobs by outcome", ["outcome"], registry=self.registry)
        self.gpu_memory = Gauge(
            "luna_gpu_memory_bytes",
            "GPU memory in use (NVML), per GPU",
            ["gpu", "uuid"],
            registry=self.registry,
        )
        self.model_bytes = Gauge(
            "luna_model_bytes", "Bytes of weights resident, per model", ["model"], registry=self.registry
        )
        self.info = Gauge(
            "luna_service_info", "Constant 1 with the service kind", ["service"], registry=self.registry
        )
        self.info.labels(**labels).set(1)

    def stage(self, stage: str, seconds: float) -> None:
        """One request's (or batch's) time in a stage of the path."""
        self.stage_seconds.labels(stage=stage).observe(seconds)
        self.stages.add(stage, seconds)
