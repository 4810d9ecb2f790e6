"""Helpers of `python -m detailflow_engine.profile`: stage ranges (instrument), tables and floors (analysis)."""
