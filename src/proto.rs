//! Generated protobuf and gRPC types (`proto/shardwise.proto`). Nothing else in the crate
//! defines wire types.

#![allow(missing_docs, clippy::all, clippy::pedantic)]

tonic::include_proto!("shardwise.v1");

/// Wire protocol version; the handshake refuses peers with another.
pub const PROTOCOL_VERSION: u32 = 1;
