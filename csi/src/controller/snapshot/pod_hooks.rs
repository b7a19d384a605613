//! Snapshot hooks on Kubernetes: commands run, through the pod exec API, in
//! the pods that mount a member volume's PVC.
//!
//! A member volume is found as the PersistentVolume of driver
//! `csi.ballast.io` whose `volumeHandle` is its id; its `claimRef` names the
//! PVC, and the running pods of that namespace with the PVC among their
//! volumes are where the hooks run. Two sources of commands:
//!
//! - the snapshot class's `ballast.io/pre-hook` / `ballast.io/post-hook`,
//!   run as `/bin/sh -c COMMAND` in each such pod;
//! - the pods' own annotations, in the Velero style:
//!   `pre.hook.snapshot.ballast.io/command` (a JSON array of arguments, or a
//!   string run by `/bin/sh -c`), `.../container` (default: the pod's first
//!   container) and `.../timeout` (e.g. `30s`; default: the class's hook
//!   timeout); likewise `post.hook.snapshot.ballast.io/...`.
//!
//! Both run only for snapshots that ask for app consistency (a class with
//! `ballast.io/freeze` or hooks), with the local runner's failure rules: a
//! command that exits non-zero, or outlives its timeout, is [`Error::Hook`].
//!
//! # What it must never do
//!
//! Run a command in a pod that does not mount the member, or report a hook
//! as run when the exec API did not say it succeeded.

use std::time::Duration;

use async_trait::async_trait;
use k8s_openapi::api::core::v1::{PersistentVolume, Pod};
use kube::api::{Api, AttachParams, ListParams};
use tokio::io::AsyncReadExt as _;
use tracing::info;

use super::Error;
use super::quiesce::{HookCall, HookRunner, Phase};
use crate::controller::Context;
use crate::controller::volume::record::VolumeRecord;
use crate::service::DRIVER_NAME;

/// Most bytes of a hook's output kept for its error message.
const OUTPUT_TAIL_BYTES: usize = 2048;

/// Runs snapshot hooks in the pods that mount the members (see the module
/// documentation).
#[derive(Clone)]
pub struct PodExecHooks {
    client: kube::Client,
}

impl std::fmt::Debug for PodExecHooks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PodExecHooks").finish_non_exhaustive()
    }
}

/// A command for one pod: its arguments, container and timeout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PodCommand {
    /// The arguments, first the program.
    pub argv: Vec<String>,
    /// The container to run in; `None` for the pod's first container.
    pub container: Option<String>,
    /// Longest it may run; `None` for the class's hook timeout.
    pub timeout: Option<Duration>,
}

/// The annotation prefix of `phase`'s hooks: `pre.hook.snapshot.ballast.io`.
pub fn annotation_prefix(phase: Phase) -> String {
    format!("{}.hook.snapshot.ballast.io", phase.as_str())
}

/// The command a pod's annotations declare for `phase`, if any.
///
/// # Errors
///
/// [`Error::InvalidArgument`] for an empty command, a JSON array that is
/// not of strings, or a timeout that does not parse.
pub fn declared_command(
    annotations: &std::collections::BTreeMap<String, String>,
    phase: Phase,
) -> Result<Option<PodCommand>, Error> {
    let prefix = annotation_prefix(phase);
    let Some(command) = annotations.get(&format!("{prefix}/command")) else {
        return Ok(None);
    };
    if command.trim().is_empty() {
        return Err(super::invalid(format!("{prefix}/command is empty")));
    }
    let argv = if command.trim_start().starts_with('[') {
        serde_json::from_str::<Vec<String>>(command).map_err(|e| {
            super::invalid(format!(
                "{prefix}/command is not a JSON array of strings: {e}"
            ))
        })?
    } else {
        shell(command)
    };
    if argv.first().is_none_or(|p| p.trim().is_empty()) {
        return Err(super::invalid(format!("{prefix}/command is empty")));
    }
    let timeout = annotations
        .get(&format!("{prefix}/timeout"))
        .map(|t| {
            humantime::parse_duration(t.trim())
                .map_err(|e| super::invalid(format!("{prefix}/timeout {t:?}: {e}")))
        })
        .transpose()?;
    Ok(Some(PodCommand {
        argv,
        container: annotations.get(&format!("{prefix}/container")).cloned(),
        timeout,
    }))
}

fn shell(command: &str) -> Vec<String> {
    vec!["/bin/sh".to_string(), "-c".to_string(), command.to_string()]
}

impl PodExecHooks {
    /// A runner that talks to the API server of `client`.
    pub fn new(client: kube::Client) -> Self {
        Self { client }
    }

    /// The running pods that mount `volume`'s PVC; empty when no PV of this
    /// driver has the volume's handle or its claim is mounted nowhere.
    async fn pods_of(&self, volume: &VolumeRecord) -> Result<Vec<Pod>, Error> {
        let pvs: Api<PersistentVolume> = Api::all(self.client.clone());
        let list = pvs
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error(volume, "listing PersistentVolumes", e))?;
        let claim = list.items.into_iter().find_map(|pv| {
            let spec = pv.spec?;
            let csi = spec.csi?;
            if csi.driver != DRIVER_NAME || csi.volume_handle != volume.volume_id {
                return None;
            }
            let claim = spec.claim_ref?;
            Some((claim.namespace?, claim.name?))
        });
        let Some((namespace, claim)) = claim else {
            return Ok(Vec::new());
        };
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let list = pods
            .list(&ListParams::default())
            .await
            .map_err(|e| api_error(volume, "listing pods", e))?;
        Ok(list
            .items
            .into_iter()
            .filter(|pod| {
                let running =
                    pod.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running");
                let mounts = pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.volumes.as_ref())
                    .is_some_and(|volumes| {
                        volumes.iter().any(|v| {
                            v.persistent_volume_claim
                                .as_ref()
                                .is_some_and(|c| c.claim_name == claim)
                        })
                    });
                running && mounts
            })
            .collect())
    }

    /// Runs `command` in `pod` to success within its timeout.
    async fn exec(
        &self,
        volume: &VolumeRecord,
        pod: &Pod,
        command: &PodCommand,
        default_timeout: Duration,
    ) -> Result<(), Error> {
        let name = pod.metadata.name.clone().unwrap_or_default();
        let namespace = pod.metadata.namespace.clone().unwrap_or_default();
        let container = command.container.clone().or_else(|| {
            pod.spec
                .as_ref()
                .and_then(|s| s.containers.first())
                .map(|c| c.name.clone())
        });
        let Some(container) = container else {
            return Err(hook_error(
                volume,
                &namespace,
                &name,
                "the pod has no container",
            ));
        };
        let timeout = command.timeout.unwrap_or(default_timeout);
        let pods: Api<Pod> = Api::namespaced(self.client.clone(), &namespace);
        let run = async {
            let params = AttachParams::default()
                .container(container.clone())
                .stdin(false)
                .stdout(true)
                .stderr(true);
            let mut attached = pods
                .exec(&name, command.argv.clone(), &params)
                .await
                .map_err(|e| hook_error(volume, &namespace, &name, &format!("exec failed: {e}")))?;
            // Both at once: a command that fills one pipe while the other
            // is not read would stall until its timeout.
            let (mut out, mut err) = (Vec::new(), Vec::new());
            let (stdout, stderr) = (attached.stdout(), attached.stderr());
            tokio::join!(
                async {
                    if let Some(mut stdout) = stdout {
                        let _ = stdout.read_to_end(&mut out).await;
                    }
                },
                async {
                    if let Some(mut stderr) = stderr {
                        let _ = stderr.read_to_end(&mut err).await;
                    }
                }
            );
            let mut output = out;
            output.extend_from_slice(&err);
            let status = match attached.take_status() {
                Some(status) => status.await,
                None => None,
            };
            Ok::<_, Error>((status, output))
        };
        let (status, output) = tokio::time::timeout(timeout, run).await.map_err(|_| {
            hook_error(
                volume,
                &namespace,
                &name,
                &format!("timed out after {timeout:?}"),
            )
        })??;
        let tail = output_tail(&output);
        match status {
            Some(s) if s.status.as_deref() == Some("Success") => {
                info!(volume.id = %volume.volume_id, pod = %format!("{namespace}/{name}"), %container, "Hook ran");
                Ok(())
            }
            Some(s) => Err(hook_error(
                volume,
                &namespace,
                &name,
                &format!(
                    "{} (output: {tail})",
                    s.message
                        .unwrap_or_else(|| "the command failed".to_string())
                ),
            )),
            None => Err(hook_error(
                volume,
                &namespace,
                &name,
                &format!("the exec API reported no status (output: {tail})"),
            )),
        }
    }
}

#[async_trait]
impl HookRunner for PodExecHooks {
    async fn run(&self, _context: &Context, hook: &HookCall<'_>) -> Result<(), Error> {
        // The ids are CSI names Ballast validated (no quotes or spaces).
        let command = PodCommand {
            argv: shell(&format!(
                "export BALLAST_VOLUME_ID='{}' BALLAST_SNAPSHOT_ID='{}' BALLAST_HOOK_PHASE='{}'; {}",
                hook.volume.volume_id,
                hook.snapshot_id,
                hook.phase.as_str(),
                hook.command
            )),
            container: None,
            timeout: None,
        };
        for pod in self.pods_of(hook.volume).await? {
            self.exec(hook.volume, &pod, &command, hook.timeout).await?;
        }
        Ok(())
    }

    async fn run_declared(
        &self,
        _context: &Context,
        volumes: &[&VolumeRecord],
        phase: Phase,
        default_timeout: Duration,
    ) -> Result<Vec<u32>, Error> {
        let mut ran = vec![0; volumes.len()];
        // A pod that mounts several members (data and WAL) runs its hook once.
        let mut done = std::collections::HashSet::new();
        for (i, volume) in volumes.iter().enumerate() {
            for pod in self.pods_of(volume).await? {
                let uid = pod.metadata.uid.clone().unwrap_or_default();
                if !done.insert(uid) {
                    continue;
                }
                let annotations = pod.metadata.annotations.clone().unwrap_or_default();
                if let Some(command) = declared_command(&annotations, phase)? {
                    self.exec(volume, &pod, &command, default_timeout).await?;
                    ran[i] += 1;
                }
            }
        }
        Ok(ran)
    }
}

fn output_tail(output: &[u8]) -> String {
    let start = output.len().saturating_sub(OUTPUT_TAIL_BYTES);
    String::from_utf8_lossy(&output[start..]).trim().to_string()
}

fn hook_error(volume: &VolumeRecord, namespace: &str, pod: &str, message: &str) -> Error {
    Error::Hook {
        volume: volume.volume_id.clone(),
        node: format!("pod {namespace}/{pod}"),
        message: message.to_string(),
    }
}

fn api_error(volume: &VolumeRecord, what: &str, err: kube::Error) -> Error {
    Error::Hook {
        volume: volume.volume_id.clone(),
        node: "the Kubernetes API".to_string(),
        message: format!("{what}: {err}"),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    fn annotations(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn annotations_declare_commands_per_phase() {
        let a = annotations(&[
            (
                "pre.hook.snapshot.ballast.io/command",
                r#"["psql", "-c", "CHECKPOINT"]"#,
            ),
            ("pre.hook.snapshot.ballast.io/container", "postgres"),
            ("pre.hook.snapshot.ballast.io/timeout", "45s"),
            (
                "post.hook.snapshot.ballast.io/command",
                "echo thawed >> /tmp/log",
            ),
        ]);
        assert_eq!(
            declared_command(&a, Phase::Pre).ok().flatten(),
            Some(PodCommand {
                argv: vec!["psql".into(), "-c".into(), "CHECKPOINT".into()],
                container: Some("postgres".into()),
                timeout: Some(Duration::from_secs(45)),
            })
        );
        assert_eq!(
            declared_command(&a, Phase::Post).ok().flatten(),
            Some(PodCommand {
                argv: vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    "echo thawed >> /tmp/log".into()
                ],
                container: None,
                timeout: None,
            })
        );
        assert_eq!(
            declared_command(&BTreeMap::new(), Phase::Pre).ok(),
            Some(None)
        );
    }

    #[test]
    fn bad_annotations_are_invalid_arguments_not_commands() {
        for (key, value) in [
            ("pre.hook.snapshot.ballast.io/command", "[1, 2]"),
            ("pre.hook.snapshot.ballast.io/command", "[]"),
            ("pre.hook.snapshot.ballast.io/command", "   "),
        ] {
            let a = annotations(&[(key, value)]);
            assert!(
                matches!(
                    declared_command(&a, Phase::Pre),
                    Err(Error::InvalidArgument { .. })
                ),
                "{value:?} was accepted"
            );
        }
        let a = annotations(&[
            ("pre.hook.snapshot.ballast.io/command", "true"),
            ("pre.hook.snapshot.ballast.io/timeout", "soon"),
        ]);
        assert!(declared_command(&a, Phase::Pre).is_err());
    }
}
