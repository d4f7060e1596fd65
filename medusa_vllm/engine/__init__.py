"""Everything that touches vLLM: plugin and option translation, the runner mixin, proposer, verifier, tree plan; device backends in subpackages (cpu/)."""
