"""The metrics of work that can wait (one set per registry; each family on the dashboard)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

JOB_STATES = ("building", "submitted", "completed", "failed")


class BatchMetrics:
    """Parked requests, jobs by state, job age, requests per job, fallbacks, cost saved."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.parked = Counter(
            "llm_streams_batch_parked", "Requests parked for a Batch API job", registry=registry)
        self.jobs = Gauge(
            "llm_streams_batch_jobs", "Batch API jobs this worker coordinates, by state "
            "(building: uploading and creating; submitted: the provider runs it; completed "
            "and failed: answers being published)", ["state"], registry=registry)
        self.jobs_finished = Counter(
            "llm_streams_batch_jobs_finished", "Batch API jobs finished, by how",
            ["state"], registry=registry)
        self.job_age = Gauge(
            "llm_streams_batch_job_age_seconds",
            "Age of the oldest Batch API job this worker coordinates", registry=registry)
        self.requests_per_job = Histogram(
            "llm_streams_batch_requests_per_job", "Requests in one Batch API job",
            buckets=(1, 10, 100, 1_000, 5_000, 10_000, 25_000, 50_000), registry=registry)
        self.answered = Counter(
            "llm_streams_batch_answered", "Requests answered from a Batch API job",
            registry=registry)
        self.fallbacks = Counter(
            "llm_streams_batch_fallbacks", "Requests that took the normal path instead of (or "
            "after) a batch job, by reason (deadline, line_error, job_failed, no_endpoint, "
            "submit_failed, budget)", ["reason"], registry=registry)
        self.late_dropped = Counter(
            "llm_streams_batch_late_results_dropped", "Batch results dropped because the "
            "request was answered by a normal call already", registry=registry)
        self.cost_saved = Counter(
            "llm_streams_batch_cost_saved", "Cost saved by batching: the normal price minus "
            "the batch price of the answers (in the pricing's currency)", registry=registry)
        for state in JOB_STATES:
            self.jobs.labels(state)
