"""Prometheus metrics: plain loop-owned instruments (``instruments``), RPC counting
wrapped around each method (``rpc_metrics``), a scrape-time snapshot of broker state
(``snapshot``), its metric families (``collector``) and the HTTP endpoint
(``exporter``). ``streamd.server`` wires them.

Kept import-free here: the service layer imports ``instruments`` alone.
"""
