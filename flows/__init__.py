"""Prefect flows, installed as ``mmops_flows``. Orchestration only: the work is in :mod:`mmops`."""
