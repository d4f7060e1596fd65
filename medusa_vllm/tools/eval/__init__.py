"""``medusa-vllm eval translation``: seed 003's translation table on an offline corpus.

Spanish (Reina-Valera 1909) -> English (World English Bible) verse pairs from the
Debian SWORD modules (:mod:`.data`), decoded by vanilla vLLM, Medusa greedy with
1..K heads, typical acceptance, beam-drafted Medusa trees and vLLM's own beam
search, one engine per configuration in a subprocess (:mod:`.rows`, :mod:`.child`);
BLEU, ROUGE-1/2/L, real-time factor (:mod:`.metrics`); markdown, JSON and a plot
(:mod:`.report`); the command itself in :mod:`.translation`.
"""
