//! Exports: what a server offers and how each export is advertised.
//!
//! This module owns the [`Export`] type, the table a server looks names up
//! in, and the two things every client is told about an export: its
//! transmission flags and its block size constraints. It never touches the
//! network; `handshake` encodes what is decided here.

use std::collections::BTreeMap;
use std::sync::Arc;

use super::protocol::{self, BlockSizes, tx_flag};
use crate::block::BlockDevice;

/// Largest payload in bytes of one `NBD_CMD_READ` or `NBD_CMD_WRITE`: 32 MiB.
///
/// The spec ("Block size constraints") says a length below 2^25 should never
/// be treated as a denial of service, and Linux's nbd driver caps requests at
/// 32 MiB, so this is the smallest maximum that every client accepts.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// The block size constraints every export advertises in
/// `NBD_INFO_BLOCK_SIZE`.
///
/// - Minimum 1 byte: [`BlockDevice`] accepts unaligned offsets and lengths
///   (an `O_DIRECT` back end widens the request itself), so any larger
///   minimum would only push read-modify-write into clients and break the
///   ones that cannot learn constraints (`NBD_OPT_EXPORT_NAME`). It is also
///   the spec's default, so a client that never asks is still served
///   correctly and we never need `NBD_REP_ERR_BLOCK_SIZE_REQD`.
/// - Preferred 4096 bytes: replicas live on XFS with 4 KiB blocks and are
///   written with `O_DIRECT`; aligned 4 KiB requests avoid read-modify-write.
/// - Maximum [`MAX_PAYLOAD`] (32 MiB): bounds the memory one request pins.
pub const BLOCK_SIZES: BlockSizes = BlockSizes {
    minimum: 1,
    preferred: 4096,
    maximum: MAX_PAYLOAD,
};

/// Transmission flags of every export (spec "Transmission flags").
///
/// `NBD_FLAG_CAN_MULTI_CONN` is set because all connections to an export
/// share one [`BlockDevice`] whose flush is device-wide and which keeps no
/// per-connection cache: a flush or FUA write on any connection covers the
/// writes completed on all of them. `NBD_FLAG_SEND_DF` is added only when the
/// client negotiated structured replies, as the spec requires.
pub fn transmission_flags(structured_replies: bool) -> u16 {
    let base = tx_flag::HAS_FLAGS
        | tx_flag::SEND_FLUSH
        | tx_flag::SEND_FUA
        | tx_flag::SEND_TRIM
        | tx_flag::SEND_WRITE_ZEROES
        | tx_flag::CAN_MULTI_CONN;
    if structured_replies {
        base | tx_flag::SEND_DF
    } else {
        base
    }
}

/// One named block device offered to NBD clients.
#[derive(Clone)]
pub struct Export {
    /// Export name clients select it by (an NBD string: UTF-8, no NUL, at
    /// most 4096 bytes). The first export of a server is also its default
    /// export, selected by the empty name.
    pub name: String,
    /// The device that serves the export's I/O.
    pub device: Arc<dyn BlockDevice>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("size_bytes", &self.device.size_bytes())
            .finish()
    }
}

/// The exports of one server, looked up by name.
#[derive(Debug)]
pub(crate) struct ExportTable {
    by_name: BTreeMap<String, Arc<Export>>,
    default: Arc<Export>,
}

impl ExportTable {
    /// Builds a table whose default export is `default`.
    ///
    /// # Errors
    /// Returns the offending name if a name is not a valid NBD string or is
    /// used twice.
    pub(crate) fn new(default: Export, others: Vec<Export>) -> Result<Self, String> {
        let default = Arc::new(default);
        let mut by_name = BTreeMap::new();
        for export in std::iter::once(default.clone()).chain(others.into_iter().map(Arc::new)) {
            if protocol::decode_string(export.name.as_bytes()).is_err() {
                return Err(export.name.clone());
            }
            let name = export.name.clone();
            if by_name.insert(name.clone(), export).is_some() {
                return Err(name);
            }
        }
        Ok(Self { by_name, default })
    }

    /// Finds an export by name; the empty name selects the default export.
    pub(crate) fn lookup(&self, name: &str) -> Option<&Arc<Export>> {
        if name.is_empty() {
            return Some(&self.default);
        }
        self.by_name.get(name)
    }

    /// All exports, in name order.
    pub(crate) fn iter(&self) -> impl Iterator<Item = &Arc<Export>> {
        self.by_name.values()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nbd::tests::MemDevice;

    fn export(name: &str) -> Export {
        Export {
            name: name.to_owned(),
            device: Arc::new(MemDevice::new(4096)),
        }
    }

    #[test]
    fn empty_name_selects_default() {
        let table = ExportTable::new(export("a"), vec![export("b")]).expect("valid");
        assert_eq!(table.lookup("").map(|e| e.name.as_str()), Some("a"));
        assert_eq!(table.lookup("b").map(|e| e.name.as_str()), Some("b"));
        assert!(table.lookup("c").is_none());
        let names: Vec<_> = table.iter().map(|e| e.name.as_str()).collect();
        assert_eq!(names, ["a", "b"]);
    }

    #[test]
    fn bad_or_duplicate_names_are_refused() {
        assert!(ExportTable::new(export("a"), vec![export("a")]).is_err());
        assert!(ExportTable::new(export("a\0b"), vec![]).is_err());
    }

    #[test]
    fn block_sizes_follow_spec_rules() {
        let s = BLOCK_SIZES;
        assert!(s.minimum.is_power_of_two() && s.minimum <= 1 << 16);
        assert!(s.preferred.is_power_of_two() && s.preferred >= s.minimum.max(512));
        assert_eq!(s.maximum % s.minimum, 0);
        assert!(s.maximum >= s.preferred);
    }

    #[test]
    fn df_only_with_structured_replies() {
        assert_eq!(transmission_flags(false) & tx_flag::SEND_DF, 0);
        assert_ne!(transmission_flags(true) & tx_flag::SEND_DF, 0);
        assert_eq!(transmission_flags(true) & tx_flag::READ_ONLY, 0);
    }
}
