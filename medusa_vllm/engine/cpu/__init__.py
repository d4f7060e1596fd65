"""CPU backend: worker, model runner, tree attention over vLLM's paged CPU KV cache, cache-layout probe, KV copies."""
