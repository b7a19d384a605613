//! Replicas: the files in a pool that each hold one full copy of a volume.
//! [`data`] is the data path of one replica file (`O_DIRECT` reads and
//! writes through the [`crate::uring`] engine, behind the
//! [`crate::block::BlockDevice`] trait); it knows nothing of catalogs,
//! metadata or epochs, which the rest of this module owns.

pub mod data;
