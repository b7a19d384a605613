//! `ballast pool ...`: the agent's storage pools.

use ballast_proto::agent::{
    GetPoolRequest, ListPoolsRequest, pool_service_client::PoolServiceClient,
};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;

#[derive(Subcommand)]
pub enum PoolCommand {
    /// Lists pools with their capacity.
    List,
    /// Shows one pool.
    Show {
        /// Pool name.
        name: String,
    },
}

pub async fn run(cmd: PoolCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = PoolServiceClient::new(channel);
    let pools = match cmd {
        PoolCommand::List => {
            client
                .list_pools(ListPoolsRequest {})
                .await
                .map_err(|s| status_error("Listing pools failed", s))?
                .into_inner()
                .pools
        }
        PoolCommand::Show { name } => {
            let pool = client
                .get_pool(GetPoolRequest { name: name.clone() })
                .await
                .map_err(|s| status_error(&format!("Showing pool {name} failed"), s))?
                .into_inner();
            if let Format::Json = format {
                return output::print_item(format, &pool, "");
            }
            vec![pool]
        }
    };
    output::print_list(
        format,
        &pools,
        &[
            "NAME",
            "DEVICE",
            "TOTAL",
            "FREE",
            "PROVISIONED",
            "LIMIT",
            "REPLICAS",
            "MOUNT",
        ],
        |p| {
            vec![
                p.name.clone(),
                p.device.clone(),
                output::bytes(p.total_bytes),
                output::bytes(p.free_bytes),
                output::bytes(p.provisioned_bytes),
                format!("{}%", p.overcommit_percent),
                p.replica_count.to_string(),
                p.mount_path.clone(),
            ]
        },
    )
}
