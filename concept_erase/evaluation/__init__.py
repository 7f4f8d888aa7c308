"""Evaluation: generate a suite's prompts with a model (and an erasure), score, report, compare.

`run_eval` is `concept-erase eval`; `report.compare` is `concept-erase compare`. Metrics plug in by
name (`metrics.METRICS`): judge, domain_fid, clip_classifier, style, clip_score, fid, nudity.
"""
