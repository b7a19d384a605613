//! `ballast replica ...`: replica files in the agent's pools.

use ballast_proto::agent::{
    CreateReplicaRequest, DestroyReplicaRequest, GrowReplicaRequest, ListReplicasRequest,
    replica_service_client::ReplicaServiceClient,
};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;
use ballast_storage_node::parse_bytes;

#[derive(Subcommand)]
pub enum ReplicaCommand {
    /// Creates a replica (idempotent for the same name and size).
    Create {
        /// Replica name: letters, digits, '.', '_' and '-'.
        name: String,
        /// Size in bytes, with an optional suffix (1GiB, 512Mi, 10G); a
        /// multiple of 4096.
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
        /// Sparse file: space is allocated as data is written.
        #[arg(long)]
        thin: bool,
        /// Pool to create it in (default: the pool with most free space).
        #[arg(long, default_value = "")]
        pool: String,
        /// Volume the replica belongs to. Without it the replica is
        /// standalone: `ballast export start` can serve it, no target ever
        /// uses it.
        #[arg(long, default_value = "")]
        volume_id: String,
    },
    /// Grows a replica to a larger size.
    Grow {
        /// Replica name.
        name: String,
        /// New size in bytes, with an optional suffix.
        #[arg(long, value_parser = parse_bytes)]
        size: u64,
    },
    /// Lists replicas.
    List,
    /// Destroys a replica and its data.
    Destroy {
        /// Replica name.
        name: String,
    },
}

pub async fn run(cmd: ReplicaCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = ReplicaServiceClient::new(channel);
    match cmd {
        ReplicaCommand::Create {
            name,
            size,
            thin,
            pool,
            volume_id,
        } => {
            let replica = client
                .create_replica(CreateReplicaRequest {
                    name: name.clone(),
                    size_bytes: size,
                    thin,
                    pool,
                    volume_id,
                    source_snapshot: String::new(),
                })
                .await
                .map_err(|s| status_error(&format!("Creating replica {name} failed"), s))?
                .into_inner();
            let text = format!(
                "Created replica {} ({}, {}) in pool {}",
                replica.name,
                output::bytes(replica.size_bytes),
                if replica.thin { "thin" } else { "thick" },
                replica.pool
            );
            output::print_item(format, &replica, &text)
        }
        ReplicaCommand::Grow { name, size } => {
            let replica = client
                .grow_replica(GrowReplicaRequest {
                    name: name.clone(),
                    size_bytes: size,
                })
                .await
                .map_err(|s| status_error(&format!("Growing replica {name} failed"), s))?
                .into_inner();
            let text = format!(
                "Replica {} is now {}",
                replica.name,
                output::bytes(replica.size_bytes)
            );
            output::print_item(format, &replica, &text)
        }
        ReplicaCommand::List => {
            let replicas = client
                .list_replicas(ListReplicasRequest {})
                .await
                .map_err(|s| status_error("Listing replicas failed", s))?
                .into_inner()
                .replicas;
            output::print_list(
                format,
                &replicas,
                &[
                    "NAME",
                    "POOL",
                    "VOLUME",
                    "SIZE",
                    "ALLOCATED",
                    "TYPE",
                    "EPOCH",
                    "EXPORTED",
                ],
                |r| {
                    vec![
                        r.name.clone(),
                        r.pool.clone(),
                        r.volume_id.clone(),
                        output::bytes(r.size_bytes),
                        output::bytes(r.allocated_bytes),
                        if r.thin { "thin" } else { "thick" }.to_string(),
                        r.epoch.to_string(),
                        if r.exported { "yes" } else { "no" }.to_string(),
                    ]
                },
            )
        }
        ReplicaCommand::Destroy { name } => {
            client
                .destroy_replica(DestroyReplicaRequest { name: name.clone() })
                .await
                .map_err(|s| status_error(&format!("Destroying replica {name} failed"), s))?;
            println!("Destroyed replica {name}");
            Ok(())
        }
    }
}
