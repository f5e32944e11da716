"""What is configured or persisted: workspace connection, circuit breaker, row ledger, job settings.

Blocks import neither flows/ nor tasks/.
"""
