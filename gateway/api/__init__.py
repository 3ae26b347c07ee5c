"""Generated protobuf code of the gateway.api.v1 contract (see proto/)."""
