"""Test-only helpers shared by tests and benchmarks (never imported by the orchestrator or trainer)."""
