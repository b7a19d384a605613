//! `ballast-agent`: the storage agent binary.

fn main() {}
