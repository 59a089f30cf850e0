//! The gRPC contract of the wallet platform: generated message types, clients and servers.
//!
//! Generated types stay at the edges. Each service converts them into its own core types at its
//! gRPC boundary; nothing below that boundary sees a protobuf type.

pub mod common {
    pub mod v1 {
        tonic::include_proto!("wallet.common.v1");
    }
}

pub mod raft {
    pub mod v1 {
        tonic::include_proto!("wallet.raft.v1");
    }
}

pub mod auticuro {
    pub mod v1 {
        tonic::include_proto!("wallet.auticuro.v1");
    }
}

pub mod marker {
    pub mod v1 {
        tonic::include_proto!("wallet.marker.v1");
    }
}

pub mod query {
    pub mod v1 {
        tonic::include_proto!("wallet.query.v1");
    }
}

/// The encoded file descriptor set of every package, for gRPC server reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("wallet_descriptor");
