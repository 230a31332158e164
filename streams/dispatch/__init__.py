"""Dispatch: which endpoint, when, and the HTTP call (dispatcher, scheduler, balancer, limits, retry)."""
