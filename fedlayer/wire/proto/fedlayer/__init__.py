"""Generated protobuf code, laid out by proto package (fedlayer.compressed.v1)."""
