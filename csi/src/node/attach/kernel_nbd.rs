//! The kernel nbd backend: `nbd-client` (from the nbd-client package)
//! connects a free `/dev/nbdN` to the export's unix socket over the nbd
//! netlink interface, and hands the socket to the kernel; no process stays
//! behind, so the device survives a restart of the node plugin.
//!
//! UNTESTED on the development machine, whose kernel has no nbd module:
//! only its parsing and bookkeeping are unit-tested. Keep it small.
//!
//! For volume `V` under the backend's root `R` (`<state_dir>/nbd`), the file
//! `R/V` holds two lines, the device (`/dev/nbd3`) and the export's URI,
//! written after the connection is made. A device counts as attached when
//! its record exists and the kernel reports it connected (non-zero size in
//! `/sys/block/nbdN/size`). nbd-client 3.24 cannot set the kernel's
//! backend identifier, which would make the record unnecessary.

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::Mutex;
use tracing::info;

use super::{
    Attacher, Attachment, Error, NbdUri, Result, command, device_in_use, read_mounts,
    sys_block_dev, validate_volume_id, wait_for,
};

/// Deadline for `nbd-client`.
const TOOL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the kernel may take to show a connected or released device.
const SETTLE_TIMEOUT: Duration = Duration::from_secs(10);

/// Attaches exports with the kernel's nbd driver. See the module docs.
#[derive(Debug)]
pub struct KernelNbd {
    root: PathBuf,
    /// Serialises attach and detach, so two attaches never pick the same
    /// free device.
    lock: Mutex<()>,
}

impl KernelNbd {
    /// Creates the backend with its records under `root`.
    pub fn new(root: PathBuf) -> Result<Self> {
        std::fs::create_dir_all(&root).map_err(|source| Error::Io {
            op: "create directory",
            path: root.clone(),
            source,
        })?;
        Ok(KernelNbd {
            root,
            lock: Mutex::new(()),
        })
    }

    fn record(&self, volume_id: &str) -> PathBuf {
        self.root.join(volume_id)
    }

    /// The recorded (device name, URI) of a volume whose device is still
    /// connected.
    fn connected(&self, volume_id: &str) -> Option<(String, String)> {
        let (name, uri) = parse_record(&std::fs::read_to_string(self.record(volume_id)).ok()?)?;
        nbd_connected(&name).then_some((name, uri))
    }
}

/// Parses a record: the device path, then the URI.
fn parse_record(text: &str) -> Option<(String, String)> {
    let mut lines = text.lines();
    let name = lines.next()?.strip_prefix("/dev/")?;
    let uri = lines.next()?;
    (name.starts_with("nbd") && name[3..].bytes().all(|b| b.is_ascii_digit()) && name.len() > 3)
        .then(|| (name.to_string(), uri.to_string()))
}

/// True when `/dev/<name>` is connected (the kernel reports a size).
fn nbd_connected(name: &str) -> bool {
    std::fs::read_to_string(format!("/sys/block/{name}/size"))
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .is_some_and(|sectors| sectors > 0)
}

/// nbd devices the kernel offers, in index order.
fn nbd_devices() -> Vec<String> {
    let Ok(entries) = std::fs::read_dir("/sys/block") else {
        return Vec::new();
    };
    let mut names: Vec<(u32, String)> = entries
        .filter_map(|e| e.ok())
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .filter_map(|n| {
            n.strip_prefix("nbd")
                .and_then(|i| i.parse().ok())
                .map(|i| (i, n))
        })
        .collect();
    names.sort();
    names.into_iter().map(|(_, n)| n).collect()
}

#[async_trait]
impl Attacher for KernelNbd {
    fn name(&self) -> &'static str {
        "kernel-nbd"
    }

    async fn attach(&self, volume_id: &str, uri: &NbdUri) -> Result<PathBuf> {
        validate_volume_id(volume_id)?;
        let _guard = self.lock.lock().await;
        if let Some((name, attached)) = self.connected(volume_id) {
            if attached != uri.as_str() {
                return Err(Error::UriMismatch {
                    volume_id: volume_id.to_string(),
                    attached,
                    requested: uri.to_string(),
                });
            }
            return Ok(PathBuf::from("/dev").join(name));
        }
        if !super::kernel_nbd_available() {
            return Err(Error::Unavailable(
                "the kernel's nbd driver is not loaded (modprobe nbd)".into(),
            ));
        }
        // Devices other volumes' records name are taken even if the kernel
        // lost the connection (the filesystem above may still be mounted).
        let recorded: Vec<String> = std::fs::read_dir(&self.root)
            .map(|rd| {
                rd.filter_map(|e| e.ok())
                    .filter_map(|e| std::fs::read_to_string(e.path()).ok())
                    .filter_map(|t| parse_record(&t).map(|(n, _)| n))
                    .collect()
            })
            .unwrap_or_default();
        let name = nbd_devices()
            .into_iter()
            .find(|n| !nbd_connected(n) && !recorded.contains(n))
            .ok_or(Error::NoFreeDevice)?;
        let device = PathBuf::from("/dev").join(&name);
        let mut args: Vec<&std::ffi::OsStr> = vec!["-unix".as_ref(), uri.socket().as_os_str()];
        args.push(device.as_os_str());
        if !uri.export().is_empty() {
            args.push("-N".as_ref());
            args.push(uri.export().as_ref());
        }
        command::run("nbd-client", args, TOOL_TIMEOUT)
            .await
            .map_err(|source| Error::Tool {
                what: "nbd-client",
                source,
            })?;
        let settled = wait_for(
            format!("{} to connect", device.display()),
            SETTLE_TIMEOUT,
            || nbd_connected(&name).then_some(()),
        )
        .await;
        let record = self.record(volume_id);
        let written = settled.and_then(|()| {
            std::fs::write(&record, format!("{}\n{}\n", device.display(), uri)).map_err(|source| {
                Error::Io {
                    op: "write",
                    path: record.clone(),
                    source,
                }
            })
        });
        if let Err(e) = written {
            let _ = command::run(
                "nbd-client",
                ["-d".as_ref(), device.as_os_str()],
                TOOL_TIMEOUT,
            )
            .await;
            return Err(e);
        }
        info!(volume.id = volume_id, device = %device.display(), "attached through kernel nbd");
        Ok(device)
    }

    async fn detach(&self, volume_id: &str) -> Result<()> {
        validate_volume_id(volume_id)?;
        let _guard = self.lock.lock().await;
        let record = self.record(volume_id);
        let Some((name, _)) = std::fs::read_to_string(&record)
            .ok()
            .and_then(|t| parse_record(&t))
        else {
            let _ = std::fs::remove_file(&record);
            return Ok(());
        };
        let device = PathBuf::from("/dev").join(&name);
        if nbd_connected(&name) {
            let mounts = read_mounts()?;
            if sys_block_dev(&name).is_some_and(|dev| device_in_use(&name, dev, &mounts)) {
                return Err(Error::DeviceBusy {
                    volume_id: volume_id.to_string(),
                    device,
                });
            }
            command::run(
                "nbd-client",
                ["-d".as_ref(), device.as_os_str()],
                TOOL_TIMEOUT,
            )
            .await
            .map_err(|source| Error::Tool {
                what: "nbd-client -d",
                source,
            })?;
            wait_for(
                format!("{} to disconnect", device.display()),
                SETTLE_TIMEOUT,
                || (!nbd_connected(&name)).then_some(()),
            )
            .await?;
        }
        std::fs::remove_file(&record).map_err(|source| Error::Io {
            op: "remove",
            path: record.clone(),
            source,
        })?;
        info!(volume.id = volume_id, device = %device.display(), "detached kernel nbd device");
        Ok(())
    }

    async fn list(&self) -> Result<Vec<Attachment>> {
        let Ok(entries) = std::fs::read_dir(&self.root) else {
            return Ok(Vec::new());
        };
        let mut found: Vec<Attachment> = entries
            .filter_map(|e| e.ok())
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|v| validate_volume_id(v).is_ok())
            .filter_map(|v| {
                self.connected(&v).map(|(name, uri)| Attachment {
                    volume_id: v,
                    device: Some(Path::new("/dev").join(name)),
                    uri: Some(uri),
                    // The kernel drops a dead connection's size to 0, so a
                    // connected device is all that can be told.
                    problem: None,
                })
            })
            .collect();
        found.sort_by(|a, b| a.volume_id.cmp(&b.volume_id));
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_and_reject_other_devices() {
        assert_eq!(
            parse_record("/dev/nbd12\nnbd+unix:///v?socket=/s\n"),
            Some(("nbd12".to_string(), "nbd+unix:///v?socket=/s".to_string()))
        );
        assert_eq!(parse_record("/dev/sda\nx\n"), None);
        assert_eq!(parse_record("/dev/nbd\nx\n"), None);
        assert_eq!(parse_record("/dev/nbd1\n"), None);
    }
}
