"""Generated from proto/gateway/api/v1 by scripts/gen_protos.py. Do not edit."""
