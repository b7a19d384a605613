//! Snapshot copy tests on real file-backed XFS pools (root).
