"""Generated protobuf code, laid out by proto package (protoc -I fedlayer/wire/proto)."""
