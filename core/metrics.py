"""Prometheus metrics, one registry for the process (prometheus-client)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

REGISTRY = CollectorRegistry(auto_describe=True)

_LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80, 160)

MESSAGES = Counter(
    "botd_messages_total", "Messages handled, by platform and outcome", ["platform", "outcome"], registry=REGISTRY
)
QUEUE_DEPTH = Gauge("botd_queue_depth", "Jobs waiting for the inference worker", registry=REGISTRY)
QUEUE_WAIT = Histogram(
    "botd_queue_wait_seconds", "Time a job waited before generation", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
GENERATION = Histogram(
    "botd_generation_seconds", "Generation time per job", buckets=_LATENCY_BUCKETS, registry=REGISTRY
)
TTFT = Histogram(
    "botd_time_to_first_token_seconds", "Start of generation to first token", buckets=_LATENCY_BUCKETS,
    registry=REGISTRY,
)
TOKENS_PER_SECOND = Gauge("botd_tokens_per_second", "Decode rate of the last finished job", registry=REGISTRY)
TOKENS = Counter("botd_tokens_total", "Tokens processed", ["kind"], registry=REGISTRY)
REDIS_ERRORS = Counter("botd_redis_errors_total", "Failed Redis calls", registry=REGISTRY)
RETRIEVAL = Histogram(
    "botd_retrieval_seconds", "Knowledge retrieval per message (query embedding included)",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2), registry=REGISTRY,
)
RETRIEVED_CHUNKS = Counter("botd_retrieved_chunks_total", "Chunks put into prompts", ["kb"], registry=REGISTRY)
INGESTS = Counter("botd_ingests_total", "Knowledge base ingests, by outcome", ["kb", "outcome"], registry=REGISTRY)
DUPLICATES = Counter(
    "botd_duplicates_dropped_total", "Platform redeliveries dropped", ["platform"], registry=REGISTRY
)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
