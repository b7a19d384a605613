//! The agent's fenced replicas, by volume id: [`LocalReplicas`].
//!
//! One [`FencedReplica`] per replica, opened on first use and cached, and
//! shared by everything that does I/O on the replica under an epoch: the
//! replica server (for remote targets) and the local target. Sharing the
//! instance shares the fence, so an epoch raised by either is in force for
//! both (invariant 3).
//!
//! It never changes the catalog except through a replica's
//! [`CatalogEpochStore`] (epochs), and drops a cached replica when the
//! agent destroys it.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock, PoisonError, RwLock};

use crate::replica::ReplicaCatalog;
use crate::replica::data::{self, ReplicaData};
use crate::replication::{CatalogEpochStore, FencedReplica, ReplicaResolver};
use crate::uring::IoEngine;

struct Open {
    replica_name: String,
    data: Arc<ReplicaData>,
    fenced: Arc<FencedReplica>,
}

/// The agent's fenced replicas; see the module docs.
pub struct LocalReplicas {
    catalog: Arc<Mutex<ReplicaCatalog>>,
    engine: Arc<IoEngine>,
    open: RwLock<HashMap<String, Open>>,
    data_address: OnceLock<SocketAddr>,
}

impl LocalReplicas {
    /// Fenced replicas of the replicas in `catalog`, doing I/O on `engine`.
    pub fn new(catalog: Arc<Mutex<ReplicaCatalog>>, engine: Arc<IoEngine>) -> Self {
        Self {
            catalog,
            engine,
            open: RwLock::new(HashMap::new()),
            data_address: OnceLock::new(),
        }
    }

    /// Records the address the agent's replica server listens on (once).
    pub fn set_data_address(&self, addr: SocketAddr) {
        let _ = self.data_address.set(addr);
    }

    /// The replica server's address, if it runs.
    pub fn data_address(&self) -> Option<SocketAddr> {
        self.data_address.get().copied()
    }

    /// True when `address` (HOST:PORT, as the controller advertises it) is
    /// this agent's replica server: the replica there is reached
    /// in-process.
    pub fn is_local_address(&self, address: &str) -> bool {
        let (Some(ours), Ok(theirs)) = (self.data_address(), address.parse::<SocketAddr>()) else {
            return false;
        };
        ours == theirs
            || (ours.ip().is_unspecified()
                && ours.port() == theirs.port()
                && theirs.ip().is_loopback())
    }

    /// The fenced replica of `volume_id` on this node, opening it on first
    /// use; `None` when the node has none (the replica whose metadata
    /// names the volume, preferring the one named `volume_id`). A
    /// standalone replica (empty volume id) is never returned.
    ///
    /// Errors: the replica's data file cannot be opened.
    pub fn get(&self, volume_id: &str) -> Result<Option<Arc<FencedReplica>>, data::Error> {
        // A standalone replica (no volume id) is never a volume's, whatever
        // its name: only `ballast export` serves it.
        if volume_id.is_empty() {
            return Ok(None);
        }
        if let Some(open) = self.read().get(volume_id) {
            return Ok(Some(Arc::clone(&open.fenced)));
        }
        let replica = {
            let catalog = self.catalog.lock().unwrap_or_else(PoisonError::into_inner);
            match catalog.get(volume_id) {
                Ok(replica) if replica.meta.volume_id == volume_id => Some(replica),
                Ok(_) | Err(_) => catalog
                    .list()
                    .into_iter()
                    .find(|r| r.meta.volume_id == volume_id),
            }
        };
        let Some(replica) = replica else {
            return Ok(None);
        };
        let mut open = self.open.write().unwrap_or_else(PoisonError::into_inner);
        if let Some(existing) = open.get(volume_id) {
            return Ok(Some(Arc::clone(&existing.fenced)));
        }
        let data = Arc::new(ReplicaData::open(
            &replica.data_path,
            replica.meta.size_bytes,
            Arc::clone(&self.engine),
        )?);
        let store = Arc::new(CatalogEpochStore::new(
            Arc::clone(&self.catalog),
            &replica.name,
        ));
        let fenced = Arc::new(FencedReplica::for_replica(
            &replica,
            Arc::clone(&data),
            store,
        ));
        open.insert(
            volume_id.to_owned(),
            Open {
                replica_name: replica.name.clone(),
                data,
                fenced: Arc::clone(&fenced),
            },
        );
        Ok(Some(fenced))
    }

    /// Forgets the replica named `replica_name` (it is being destroyed).
    pub fn evict(&self, replica_name: &str) {
        self.open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, open| open.replica_name != replica_name);
    }

    /// Forgets every open replica, closing their files once no target or
    /// request holds them (agent shutdown, before the pools unmount).
    pub fn close_all(&self) {
        self.open
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Serves `size_bytes` for the replica named `replica_name` if it is
    /// open (it was grown).
    ///
    /// Errors: as [`ReplicaData::set_size_bytes`].
    pub fn resize(&self, replica_name: &str, size_bytes: u64) -> Result<(), data::Error> {
        for open in self.read().values() {
            if open.replica_name == replica_name {
                open.data.set_size_bytes(size_bytes)?;
            }
        }
        Ok(())
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Open>> {
        self.open.read().unwrap_or_else(PoisonError::into_inner)
    }
}

impl ReplicaResolver for LocalReplicas {
    /// A cache hit is a map lookup; a miss looks the replica up in the
    /// catalog (its mutex) and opens the data file, once per replica.
    fn resolve(&self, volume_id: &str) -> Option<Arc<FencedReplica>> {
        match self.get(volume_id) {
            Ok(found) => found,
            Err(error) => {
                tracing::warn!(volume.id = %volume_id, error = %crate::error_chain(&error), "Cannot open replica");
                None
            }
        }
    }
}
