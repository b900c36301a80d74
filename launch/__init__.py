"""Launchers: training runs on clusters and TPU VMs, and fine-tuning sweeps (launch/sweep.py)."""
