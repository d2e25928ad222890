"""fedlayer.compressed.v1 messages; update_pb2 is generated from update.proto."""
