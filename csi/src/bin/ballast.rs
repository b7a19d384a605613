//! ballast CLI.
fn main() {}
