"""lacuna: a tiny, hackable LLM training framework (prepare → shards → FSDP2 train)."""

__version__ = "0.1.0"
