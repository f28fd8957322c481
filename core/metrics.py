"""Prometheus metrics, one registry for the process (prometheus-client)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
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
MERGED_MESSAGES = Counter(
    "botd_messages_merged_total", "Messages answered as part of an earlier one of their burst ([queue] debounce_s)",
    ["platform"], registry=REGISTRY
)
QUEUE_NOTICES = Counter(
    "botd_queue_notices_total", "Waiting notices shown ([queue] notice_after_s)", ["platform"], registry=REGISTRY
)
# Tool calls ([tools.NAME]; an MCP server's tools as NAME__tool), by outcome: ok, error, timeout,
# refused, invalid (arguments that do not fit the schema).
TOOL_CALLS = Counter("botd_tool_calls_total", "Tool calls, by tool and outcome", ["tool", "outcome"],
                     registry=REGISTRY)
TOOL_SECONDS = Histogram(
    "botd_tool_call_seconds", "Time per tool call", ["tool"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60), registry=REGISTRY,
)

# Per bot (the configured bots' names only: as many label values as bots in config.toml).
BOT_ANSWERS = Counter("botd_bot_answers_total", "Answers per bot: answered, error (cut short: error, cancel, expiry), "
                      "refused (no document matched)", ["bot", "outcome"], registry=REGISTRY)
BOT_TOKENS = Counter("botd_bot_tokens_total", "Tokens per bot, in (prompt) and out (generated)", ["bot", "kind"],
                     registry=REGISTRY)
BOT_FEEDBACK = Counter("botd_bot_feedback_total", "Votes cast on answers per bot, up or down (a changed vote counts "
                       "again)", ["bot", "vote"], registry=REGISTRY)
BOT_TTFT = Histogram("botd_bot_time_to_first_token_seconds", "Start of generation to first token, per bot", ["bot"],
                     buckets=_LATENCY_BUCKETS, registry=REGISTRY)
BOT_QUEUE_WAIT = Histogram("botd_bot_queue_wait_seconds", "Time a job waited before generation, per bot", ["bot"],
                           buckets=_LATENCY_BUCKETS, registry=REGISTRY)


class _EngineCollector:
    """The engine's own counters (slots, batches, prompt tokens read vs reused, state cache),
    read when /metrics is scraped: the worker thread keeps them as plain numbers."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, Any]] | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        state = self.source() if self.source is not None else {}
        if not state:
            return
        gauges = {"active_sequences": "Sequences being generated now",
                  "slots": "Sequences the engine decodes at once ([model] parallel)",
                  "last_batch": "Tokens in the last decode step",
                  "last_micro_batches": "Micro-batches (passes over the weights) of the last decode step",
                  "state_cache_bytes": "Bytes of saved per-thread KV states",
                  "state_cache_entries": "Threads with a saved KV state"}
        for key, doc in gauges.items():
            if key in state:
                yield GaugeMetricFamily(f"botd_engine_{key}", doc, value=state[key])
        counters = {"steps": "Decode steps", "batch_tokens": "Tokens decoded in all steps",
                    "state_cache_evictions": "Saved KV states evicted to stay within [model] cache_mb",
                    "cache_restores": "Saved KV states restored into a slot",
                    "micro_batches": "Micro-batches llama.cpp cut the decode steps into (each one a pass over "
                                     "the weights; ideally one a step)",
                    "slot_moves": "KV states moved to another slot to keep a step's sequence ids consecutive",
                    "shared_prefix_copies": "New threads given their bot's system turn copied from its saved "
                                            "state instead of reading it",
                    "draft_tokens": "Tokens guessed ahead from answers' own conversations ([model] draft_tokens)",
                    "draft_accepted": "Guessed tokens the model agreed with (each one a decode step saved)"}
        for key, doc in counters.items():
            if key in state:
                yield CounterMetricFamily(f"botd_engine_{key}", doc, value=state[key])
        if "prompt_tokens_read" in state:
            prompt = CounterMetricFamily("botd_engine_prompt_tokens", "Prompt tokens read, found already read "
                                         "(reused), or read ahead while idle", labels=["kind"])
            prompt.add_metric(["read"], state["prompt_tokens_read"])
            prompt.add_metric(["reused"], state["prompt_tokens_reused"])
            prompt.add_metric(["ahead"], state.get("prompt_tokens_ahead", 0))
            yield prompt
        tally = state.get("steps_by_micro_batches")
        if tally:
            yield _micro_batch_histogram(tally, state.get("micro_batches", 0))


def _micro_batch_histogram(tally: list[int], total: int) -> HistogramMetricFamily:
    """Decode steps by how many micro-batches each cost, from the engine's tally (index n: steps
    of n micro-batches; the last index: that many or more)."""
    buckets, seen = [], 0
    for n in range(1, len(tally) - 1):
        seen += tally[n]
        buckets.append((str(n), seen))
    buckets.append(("+Inf", seen + tally[-1]))
    return HistogramMetricFamily("botd_engine_micro_batches_per_step", "Micro-batches a decode step cost",
                                 buckets=buckets, sum_value=total)


ENGINE = _EngineCollector()
REGISTRY.register(ENGINE)


class _ModelsCollector:
    """Each configured model ([model] is "default"): loaded or not, queue, running answers, loads."""

    def __init__(self) -> None:
        self.source: Callable[[], dict[str, dict[str, Any]]] | None = None

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        models = self.source() if self.source is not None else {}
        if not models:
            return
        families: dict[str, GaugeMetricFamily | CounterMetricFamily] = {
            "loaded": GaugeMetricFamily("botd_model_loaded", "1 when the model is in memory", labels=["model"]),
            "queue_depth": GaugeMetricFamily("botd_model_queue_depth", "Jobs waiting for the model", labels=["model"]),
            "running": GaugeMetricFamily("botd_model_running", "Answers the model is generating", labels=["model"]),
            "loads": CounterMetricFamily("botd_model_loads", "Times the model was loaded", labels=["model"]),
            "unloads": CounterMetricFamily("botd_model_unloads", "Times the model was unloaded to make room",
                                           labels=["model"]),
        }
        for name, state in models.items():
            for key, family in families.items():
                family.add_metric([name], float(state.get(key) or 0))
        yield from families.values()


MODELS = _ModelsCollector()
REGISTRY.register(MODELS)


def render() -> tuple[bytes, str]:
    return generate_latest(REGISTRY), CONTENT_TYPE_LATEST
