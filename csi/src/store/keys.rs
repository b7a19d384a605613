//! The controller's key layout in the cluster store.
//!
//! ```text
//! /ballast/nodes/<node>             a registered node
//! /ballast/pools/<node>/<pool>      a pool of a node
//! /ballast/volumes/<volume>         a volume: size, replicas, epoch, in-sync set
//! /ballast/volume-names/<name>      CSI volume name -> volume id (idempotency)
//! /ballast/snapshots/<snapshot>     a snapshot: source volume, cut time, copies
//! /ballast/group-snapshots/<group>  a group snapshot: its member snapshots
//! ```
//!
//! Every id is one path segment: [`segment`] escapes `/` (and `%`, the escape
//! character), so a name such as `a/b` can never land under another record's
//! prefix and a prefix list never leaks into a neighbour. Everything here is
//! pure string building; the module must never read or write the store.
//!
//! To add a record type, add its directory constant (ending in `/`) and one
//! function that builds its key from escaped segments.

/// Root of every Ballast key.
pub const ROOT: &str = "/ballast/";

/// Directory of node records; list it to get every node.
pub const NODES: &str = "/ballast/nodes/";

/// Directory of pool records, one subdirectory per node.
pub const POOLS: &str = "/ballast/pools/";

/// Directory of volume records.
pub const VOLUMES: &str = "/ballast/volumes/";

/// Directory of the CSI volume name index (name to volume id).
pub const VOLUME_NAMES: &str = "/ballast/volume-names/";

/// Directory of snapshot records.
pub const SNAPSHOTS: &str = "/ballast/snapshots/";

/// The key of snapshot `snapshot` (its id, which is its CSI name).
pub fn snapshot(snapshot: &str) -> String {
    format!("{SNAPSHOTS}{}", segment(snapshot))
}

/// Directory of group snapshot records.
pub const GROUP_SNAPSHOTS: &str = "/ballast/group-snapshots/";

/// The key of group snapshot `group` (its id, which is its CSI name).
pub fn group_snapshot(group: &str) -> String {
    format!("{GROUP_SNAPSHOTS}{}", segment(group))
}

/// The key of node `node`.
pub fn node(node: &str) -> String {
    format!("{NODES}{}", segment(node))
}

/// The directory of node `node`'s pools (ends in `/`).
pub fn node_pools(node: &str) -> String {
    format!("{POOLS}{}/", segment(node))
}

/// The key of pool `pool` on node `node`.
pub fn pool(node: &str, pool: &str) -> String {
    format!("{}{}", node_pools(node), segment(pool))
}

/// The key of volume `volume` (its id, not its CSI name).
pub fn volume(volume: &str) -> String {
    format!("{VOLUMES}{}", segment(volume))
}

/// The key of the name index entry for CSI volume name `name`.
pub fn volume_name(name: &str) -> String {
    format!("{VOLUME_NAMES}{}", segment(name))
}

/// Escapes an id into one path segment: `%` becomes `%25` and `/` becomes
/// `%2F`; everything else is kept, so ordinary ids read as themselves.
pub fn segment(id: &str) -> String {
    let mut out = String::with_capacity(id.len());
    for c in id.chars() {
        match c {
            '%' => out.push_str("%25"),
            '/' => out.push_str("%2F"),
            c => out.push(c),
        }
    }
    out
}

/// The id of a key listed under `dir`: the segment after `dir`, unescaped.
/// `None` if `key` is not directly under `dir` or the segment is not one
/// that [`segment`] produces.
pub fn id_under(dir: &str, key: &str) -> Option<String> {
    let rest = key.strip_prefix(dir)?;
    if rest.is_empty() || rest.contains('/') {
        return None;
    }
    let mut out = String::with_capacity(rest.len());
    let mut chars = rest.chars();
    while let Some(c) = chars.next() {
        if c != '%' {
            out.push(c);
            continue;
        }
        match (chars.next(), chars.next()) {
            (Some('2'), Some('5')) => out.push('%'),
            (Some('2'), Some('F')) => out.push('/'),
            _ => return None,
        }
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_follow_the_layout() {
        assert_eq!(node("n1"), "/ballast/nodes/n1");
        assert_eq!(pool("n1", "p0"), "/ballast/pools/n1/p0");
        assert_eq!(volume("v-1"), "/ballast/volumes/v-1");
        assert_eq!(volume_name("pvc-9"), "/ballast/volume-names/pvc-9");
        for key in [node("n"), pool("n", "p"), volume("v"), volume_name("x")] {
            assert!(key.starts_with(ROOT), "{key}");
        }
    }

    #[test]
    fn slashes_never_leave_their_segment() {
        assert_eq!(volume_name("a/b"), "/ballast/volume-names/a%2Fb");
        // A node named "a/p" must not list under node "a"'s pools.
        assert!(!pool("a/p", "x").starts_with(&node_pools("a")));
        assert_eq!(segment("100%/x"), "100%25%2Fx");
    }

    #[test]
    fn id_under_reverses_segment() {
        for id in ["plain", "a/b", "100%", "%2F", "ü/%/"] {
            assert_eq!(id_under(VOLUMES, &volume(id)).as_deref(), Some(id), "{id}");
        }
        assert_eq!(id_under(VOLUMES, "/ballast/nodes/x"), None);
        assert_eq!(id_under(POOLS, &pool("n", "p")), None, "nested key");
        assert_eq!(id_under(VOLUMES, VOLUMES), None, "empty id");
        assert_eq!(id_under(VOLUMES, "/ballast/volumes/bad%zz"), None);
    }
}
