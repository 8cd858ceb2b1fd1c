"""Alerting in the control plane (issue 13, docs/alerts.md).

``rule``: the rule znode's schema (``/meshkeeper/<ns>/alerts/<name>``); ``state``: the shared
per-rule state znode the replicas coordinate through; ``evaluate``: the periodic evaluator over
LRS, the registry snapshot and the proxy registry; ``notify``: webhooks in Alertmanager's payload.
"""
