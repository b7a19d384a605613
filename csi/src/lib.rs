//! Ballast control plane library.
