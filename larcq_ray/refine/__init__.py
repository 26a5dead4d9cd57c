"""Refine: rewrite raw LARCQ queries with an LLM (condense | rephrase), checked, on Ray Data.

Reads: <benchmark>/queries.csv. Writes: queries_condensed.csv / queries_rephrased.csv and a report
with the reason for every kept raw query. Modules: prompts (templates), cleaning (strip LLM
wrappers), checks (flag lost events), engines (transformers | vllm | hook), config, job.
"""
