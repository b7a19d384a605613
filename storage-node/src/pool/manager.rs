//! The set of pools an agent serves, opened once at start-up.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tracing::warn;

use super::{Error, Pool, PoolConfig};

/// Every pool of the node, by name.
///
/// The set is fixed after [`PoolManager::open_all`]; pools are shared as
/// `Arc<Pool>` with the replica catalog, which provisions capacity in them.
#[derive(Debug)]
pub struct PoolManager {
    state_dir: PathBuf,
    pools: BTreeMap<String, Arc<Pool>>,
}

impl PoolManager {
    /// Opens (formats, imports or reuses) every configured pool under
    /// `state_dir`.
    ///
    /// If one fails, the pools opened before it are closed again and the
    /// error is returned: an agent starts with all its pools or not at all,
    /// so a missing disk is noticed rather than silently shrinking the node.
    ///
    /// # Errors
    ///
    /// Any error of [`Pool::open`], or [`Error::DuplicatePool`] when two
    /// sources turn out to be the same pool or share a name.
    pub fn open_all(state_dir: &Path, configs: &[PoolConfig]) -> Result<Self, Error> {
        let mut manager = Self {
            state_dir: state_dir.to_owned(),
            pools: BTreeMap::new(),
        };
        for config in configs {
            if let Err(e) = manager.open_one(config) {
                if let Err(close) = manager.close_all() {
                    warn!(error = %close, "Cannot close pools after a failed start-up");
                }
                return Err(e);
            }
        }
        Ok(manager)
    }

    fn open_one(&mut self, config: &PoolConfig) -> Result<(), Error> {
        let pool = Pool::open(&self.state_dir, config)?;
        let duplicate = self
            .pools
            .values()
            .find(|p| p.name() == pool.name() || p.uuid() == pool.uuid());
        if let Some(first) = duplicate {
            return Err(Error::DuplicatePool {
                name: pool.name().to_owned(),
                uuid: pool.uuid(),
                first: first.device().to_owned(),
                second: pool.device().to_owned(),
            });
        }
        self.pools.insert(pool.name().to_owned(), Arc::new(pool));
        Ok(())
    }

    /// Returns the state directory the pools are mounted under.
    pub fn state_dir(&self) -> &Path {
        &self.state_dir
    }

    /// Returns every pool, ordered by name.
    pub fn list(&self) -> Vec<Arc<Pool>> {
        self.pools.values().cloned().collect()
    }

    /// Returns the pool called `name`.
    ///
    /// # Errors
    ///
    /// [`Error::PoolNotFound`].
    pub fn get(&self, name: &str) -> Result<Arc<Pool>, Error> {
        self.pools
            .get(name)
            .cloned()
            .ok_or_else(|| Error::PoolNotFound {
                name: name.to_owned(),
            })
    }

    /// Chooses the pool for a new allocation of `size_bytes`: among the pools
    /// where it fits (overcommit limit, and free space when `preallocate`),
    /// the one with the most free space.
    ///
    /// The choice is advisory: the caller still reserves with
    /// [`Pool::provision`], which checks again.
    ///
    /// # Errors
    ///
    /// [`Error::NoPools`], or [`Error::NoPoolFits`] with each pool's reason.
    pub fn choose(&self, size_bytes: u64, preallocate: bool) -> Result<Arc<Pool>, Error> {
        if self.pools.is_empty() {
            return Err(Error::NoPools);
        }
        let mut best: Option<(u64, &Arc<Pool>)> = None;
        let mut reasons = Vec::new();
        for pool in self.pools.values() {
            let fits = pool
                .capacity()
                .and_then(|c| pool.check_fits(&c, size_bytes, preallocate).map(|()| c));
            match fits {
                Ok(capacity) => {
                    if best.is_none_or(|(free, _)| capacity.free_bytes > free) {
                        best = Some((capacity.free_bytes, pool));
                    }
                }
                Err(e) => reasons.push(e.to_string()),
            }
        }
        best.map(|(_, pool)| Arc::clone(pool))
            .ok_or_else(|| Error::NoPoolFits {
                requested_bytes: size_bytes,
                reasons: reasons.join("; "),
            })
    }

    /// Closes every pool (unmount, detach loop devices), trying all of them.
    ///
    /// # Errors
    ///
    /// The first error of [`Pool::close`]; the others are logged.
    pub fn close_all(&self) -> Result<(), Error> {
        let mut first_error = None;
        for pool in self.pools.values() {
            if let Err(e) = pool.close() {
                warn!(pool.name = %pool.name(), error = %e, "Cannot close pool");
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(()), Err)
    }
}
