"""User-facing tools: the medusa-vllm CLI, bench, calibrate, the embedded default model, engine subprocess helper, tiny test models."""
