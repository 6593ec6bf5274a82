//! Measurements behind `shardwise bench`.
