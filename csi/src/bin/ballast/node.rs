//! `ballast node ...`: nodes registered with the controller.

use ballast_proto::controller::{ListNodesRequest, node_service_client::NodeServiceClient};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;

#[derive(Subcommand)]
pub enum NodeCommand {
    /// Lists nodes with their state and pool capacity.
    List,
}

pub async fn run(cmd: NodeCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = NodeServiceClient::new(channel);
    match cmd {
        NodeCommand::List => {
            let nodes = client
                .list_nodes(ListNodesRequest {})
                .await
                .map_err(|s| status_error("Listing nodes failed", s))?
                .into_inner()
                .nodes;
            output::print_list(
                format,
                &nodes,
                &[
                    "NODE",
                    "STATE",
                    "AGENT",
                    "DATA",
                    "POOLS",
                    "SIZE",
                    "FREE",
                    "PROVISIONED",
                ],
                |n| {
                    let sum = |f: fn(&ballast_proto::controller::Pool) -> u64| {
                        n.pools.iter().map(f).sum::<u64>()
                    };
                    vec![
                        n.node_id.clone(),
                        n.state.clone(),
                        n.agent_address.clone(),
                        n.data_address.clone(),
                        n.pools.len().to_string(),
                        output::bytes(sum(|p| p.total_bytes)),
                        output::bytes(sum(|p| p.free_bytes)),
                        output::bytes(sum(|p| p.provisioned_bytes)),
                    ]
                },
            )
        }
    }
}
