"""channel-gateway tests: a package, so tests/connectors never shadows `connectors`."""
