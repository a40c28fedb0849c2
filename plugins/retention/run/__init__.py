"""Runs: start, purge, certify; the journal, the lease, settlement, status."""
