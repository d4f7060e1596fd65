"""Pure Medusa math in torch, never importing vLLM: heads, tree buffers, tree fitting, joint statistics, acceptance rules."""
