//! `ballast export ...`: NBD exports of replicas.

use std::path::PathBuf;

use ballast_proto::agent::{
    ListExportsRequest, StartExportRequest, StopExportRequest,
    export_service_client::ExportServiceClient,
};
use clap::Subcommand;
use tonic::transport::Channel;

use crate::output::{self, Format};
use crate::status_error;

#[derive(Subcommand)]
pub enum ExportCommand {
    /// Serves a replica over NBD; prints the NBD URI.
    Start {
        /// Replica name (also the NBD export name).
        name: String,
        /// Unix socket to listen on (absolute path on the agent's machine).
        #[arg(long)]
        socket: PathBuf,
        /// Also listen on this TCP address (HOST:PORT).
        #[arg(long)]
        tcp: Option<String>,
    },
    /// Stops an export and disconnects its clients.
    Stop {
        /// Export (replica) name.
        name: String,
    },
    /// Lists running exports.
    List,
}

pub async fn run(cmd: ExportCommand, channel: Channel, format: Format) -> anyhow::Result<()> {
    let mut client = ExportServiceClient::new(channel);
    match cmd {
        ExportCommand::Start { name, socket, tcp } => {
            let socket_path = std::path::absolute(&socket)?;
            let export = client
                .start_export(StartExportRequest {
                    name: name.clone(),
                    socket_path: socket_path.to_string_lossy().into_owned(),
                    tcp_address: tcp.unwrap_or_default(),
                })
                .await
                .map_err(|s| status_error(&format!("Starting export {name} failed"), s))?
                .into_inner();
            output::print_item(format, &export, &export.uri)
        }
        ExportCommand::Stop { name } => {
            client
                .stop_export(StopExportRequest { name: name.clone() })
                .await
                .map_err(|s| status_error(&format!("Stopping export {name} failed"), s))?;
            println!("Stopped export {name}");
            Ok(())
        }
        ExportCommand::List => {
            let exports = client
                .list_exports(ListExportsRequest {})
                .await
                .map_err(|s| status_error("Listing exports failed", s))?
                .into_inner()
                .exports;
            output::print_list(
                format,
                &exports,
                &["NAME", "URI", "TCP", "CONNECTIONS"],
                |e| {
                    vec![
                        e.name.clone(),
                        e.uri.clone(),
                        e.tcp_address.clone(),
                        e.connections.to_string(),
                    ]
                },
            )
        }
    }
}
