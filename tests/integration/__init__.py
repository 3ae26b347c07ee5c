"""Integration tests against the real RabbitMQ (and Redis)."""
