"""The bench: compare KV-cache methods with the full cache on the same prompts.

- ``memfit.bench.tasks``: RULER-style tasks (needles, variable tracking, common words) and long-text ``ppl`` /
  ``fidelity`` samples, generated locally from a seed and a target length in tokens.
- ``memfit.bench.metrics``: task scores (string match) and fidelity to the full cache (KL, top-1, perplexity).
- ``memfit.bench.report``: the ``results.jsonl`` store with resume, ``summary.csv``, ``pareto.png``, ``report.md``.
- ``memfit.bench.testing``: an offline BPE tokenizer for tests and demos.
"""
