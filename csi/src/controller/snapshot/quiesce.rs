//! App-consistent cuts: pre-hooks, filesystem freeze, the cut, thaw,
//! post-hooks, around [`cut::take_group`].
//!
//! ```text
//!  pre-hooks (member order) ─> prepare copies ─> freeze all ─> cut (pause all, copy all, resume all) ─> thaw all ─> post-hooks (reverse order)
//!      └─ a failure: post-hooks, fail ─┘          └─ a failure: thaw, post-hooks, fail ─┘
//! ```
//!
//! Only published members are quiesced: an unpublished volume has no
//! writer, so it has nothing to flush or freeze. Hooks run through a
//! [`HookRunner`]: on a local cluster, [`NodePluginHooks`] runs them as
//! processes on the member's node (its agent forwards to the node
//! plugin); on Kubernetes, [`super::pod_hooks::PodExecHooks`] runs them
//! in the pods that mount the member's PVC, with the hooks those pods
//! declare in their annotations.
//!
//! The thaw comes after the resume: FITHAW may write (XFS logs the thaw),
//! and a write behind a closed barrier would wait for the barrier's
//! deadline. The filesystem is frozen through the barrier, so no write of
//! its own lands in the cut's window either way.
//!
//! # What it must never do
//!
//! Pause a target while a pre-hook failed or a freeze was refused; leave a
//! filesystem frozen (every path after a freeze thaws, and the node plugin
//! thaws on its own at twice the cut's deadline); skip a post-hook of a
//! member whose pre-hooks started.

use std::time::Duration;

use async_trait::async_trait;
use ballast_proto::agent as agent_pb;
use futures_util::future::join_all;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::Error;
use super::cut::{self, Member, Taken};
use crate::controller::Context;
use crate::controller::agents::AgentError;
use crate::controller::volume::record::VolumeRecord;

/// Hook timeout when the request does not say.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(30);

/// Longest hook timeout a request may ask for (the node plugin's limit).
pub const MAX_HOOK_TIMEOUT: Duration = Duration::from_secs(600);

/// What a cut is asked to do for app consistency.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quiesce {
    /// Freeze each published member's filesystem around the cut.
    pub freeze: bool,
    /// Commands run on each published member, in order, before the freeze.
    pub pre_hooks: Vec<String>,
    /// Commands run on each published member, in reverse order, after the
    /// thaw (also when the snapshot failed after its pre-hooks started).
    pub post_hooks: Vec<String>,
    /// Longest one hook may run.
    pub hook_timeout: Duration,
}

impl Default for Quiesce {
    fn default() -> Self {
        Self {
            freeze: false,
            pre_hooks: Vec::new(),
            post_hooks: Vec::new(),
            hook_timeout: DEFAULT_HOOK_TIMEOUT,
        }
    }
}

impl Quiesce {
    /// True when nothing is asked beyond a crash-consistent cut.
    pub fn is_none(&self) -> bool {
        !self.freeze && self.pre_hooks.is_empty() && self.post_hooks.is_empty()
    }

    /// Checks the hook timeout and commands.
    ///
    /// # Errors
    ///
    /// [`Error::InvalidArgument`].
    pub fn validate(&self) -> Result<(), Error> {
        if self.hook_timeout.is_zero() || self.hook_timeout > MAX_HOOK_TIMEOUT {
            return Err(super::invalid(format!(
                "the hook timeout must be between 1 ms and {MAX_HOOK_TIMEOUT:?}, not {:?}",
                self.hook_timeout
            )));
        }
        if self
            .pre_hooks
            .iter()
            .chain(&self.post_hooks)
            .any(|c| c.trim().is_empty())
        {
            return Err(super::invalid("a hook command is empty"));
        }
        Ok(())
    }
}

/// What quiescing did to one member, kept in its snapshot record.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuiesceRecord {
    /// Its filesystem was frozen through the cut.
    pub frozen: bool,
    /// Hooks that ran to success.
    #[serde(default)]
    pub hooks_run: u32,
    /// Why something asked was not done (not published, block access,
    /// a post-hook that failed, a thaw the node plugin did at its
    /// deadline).
    #[serde(default)]
    pub notes: Vec<String>,
}

/// When a hook runs.
pub use crate::node::hook::Phase;

/// One hook to run for one member.
#[derive(Debug, Clone, Copy)]
pub struct HookCall<'a> {
    /// The member volume (published).
    pub volume: &'a VolumeRecord,
    /// The snapshot being taken (the group's id for a group).
    pub snapshot_id: &'a str,
    /// Before or after.
    pub phase: Phase,
    /// The command.
    pub command: &'a str,
    /// Longest it may run.
    pub timeout: Duration,
}

/// Runs snapshot hooks where the member's application is.
#[async_trait]
pub trait HookRunner: Send + Sync + std::fmt::Debug {
    /// Runs `hook` to success within its timeout.
    ///
    /// # Errors
    ///
    /// [`Error::Hook`] when the command fails or times out; the runner's
    /// own errors (an unreachable node is [`Error::Agent`]).
    async fn run(&self, context: &Context, hook: &HookCall<'_>) -> Result<(), Error>;

    /// Runs the hooks of `phase` that the applications of `volumes` declare
    /// themselves (on Kubernetes: the annotations of the pods that mount
    /// them), once per application even when it uses several members, each
    /// within `timeout` unless it names its own. Returns how many ran, per
    /// volume (a hook counts for the first member its pod mounts). Pre-hooks
    /// of this kind run after the class's, post-hooks before the class's.
    /// The local runner has none.
    ///
    /// # Errors
    ///
    /// As [`HookRunner::run`]; a bad declaration is
    /// [`Error::InvalidArgument`].
    async fn run_declared(
        &self,
        _context: &Context,
        volumes: &[&VolumeRecord],
        _phase: Phase,
        _timeout: Duration,
    ) -> Result<Vec<u32>, Error> {
        Ok(vec![0; volumes.len()])
    }
}

/// Runs hooks as processes on the member's node: the agent of the node
/// its target runs on forwards them to that node's CSI node plugin, which
/// runs `sh -c COMMAND` with the volume's staging path in
/// `BALLAST_MOUNT_PATH`.
#[derive(Debug, Default)]
pub struct NodePluginHooks;

#[async_trait]
impl HookRunner for NodePluginHooks {
    async fn run(&self, context: &Context, hook: &HookCall<'_>) -> Result<(), Error> {
        let volume_id = &hook.volume.volume_id;
        let (node, address) = target_agent(context, hook.volume).await?;
        let request = agent_pb::RunHookRequest {
            volume_id: volume_id.clone(),
            snapshot_id: hook.snapshot_id.to_string(),
            phase: hook.phase.as_str().to_string(),
            command: hook.command.to_string(),
            timeout_ms: millis(hook.timeout),
        };
        match context.agents.quiesce(&address)?.run_hook(request).await {
            Ok(_) => Ok(()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::FailedPrecondition | tonic::Code::DeadlineExceeded
                ) =>
            {
                Err(Error::Hook {
                    volume: volume_id.clone(),
                    node,
                    message: status.message().to_string(),
                })
            }
            Err(status) => Err(AgentError::new(
                &node,
                format!(
                    "Running the {} hook of volume {volume_id}",
                    hook.phase.as_str()
                ),
                status,
            )
            .into()),
        }
    }
}

/// Takes the cut of `members` as [`cut::take_group`] does, quiesced as
/// `quiesce` asks; `freeze_id` pairs freezes with thaws and names the
/// hooks' snapshot (the snapshot or group id). Returns, per member, what
/// was taken and what quiescing did.
///
/// # Errors
///
/// [`Error::Hook`] when a pre-hook fails (nothing was paused or frozen);
/// the freeze's agent errors (nothing was paused; what froze is thawed);
/// the cut's errors.
pub async fn take_group(
    context: &Context,
    members: &[Member<'_>],
    quiesce: &Quiesce,
    freeze_id: &str,
    deadline: Duration,
    asked: &mut [Vec<String>],
) -> Result<Vec<(Taken, QuiesceRecord)>, Error> {
    let mut records: Vec<QuiesceRecord> = members
        .iter()
        .map(|m| QuiesceRecord {
            notes: if m.volume.target.is_none() && !quiesce.is_none() {
                vec!["not published: no application to quiesce".to_string()]
            } else {
                Vec::new()
            },
            ..QuiesceRecord::default()
        })
        .collect();
    let quiesced = Quiesced {
        context,
        members,
        quiesce,
        freeze_id,
        deadline,
    };
    let started = match quiesced.pre_hooks(&mut records).await {
        Ok(started) => started,
        Err((err, started)) => {
            quiesced.post_hooks(&started, &mut records).await;
            return Err(err);
        }
    };
    // Prepared before the freeze: the reflink of a fragmented replica
    // takes tens of milliseconds, which the application need not spend
    // frozen; the refresh under the barrier copies what the freeze wrote.
    let prepared = match cut::prepare(context, members, deadline, asked).await {
        Ok(prepared) => prepared,
        Err(err) => {
            quiesced.post_hooks(&started, &mut records).await;
            return Err(err);
        }
    };
    let frozen = match quiesced.freeze_all(&mut records).await {
        Ok(frozen) => frozen,
        Err((err, frozen)) => {
            quiesced.thaw_all(&frozen, &mut records).await;
            quiesced.post_hooks(&started, &mut records).await;
            return Err(err);
        }
    };
    let taken = prepared.take(asked).await;
    quiesced.thaw_all(&frozen, &mut records).await;
    quiesced.post_hooks(&started, &mut records).await;
    Ok(taken?.into_iter().zip(records).collect())
}

/// The members of one quiesced cut.
struct Quiesced<'a> {
    context: &'a Context,
    members: &'a [Member<'a>],
    quiesce: &'a Quiesce,
    freeze_id: &'a str,
    deadline: Duration,
}

impl Quiesced<'_> {
    /// Runs the pre-hooks member by member; returns which members'
    /// hooks started (their post-hooks are owed), with the error if one
    /// failed.
    async fn pre_hooks(
        &self,
        records: &mut [QuiesceRecord],
    ) -> Result<Vec<bool>, (Error, Vec<bool>)> {
        let mut started = vec![false; self.members.len()];
        for (i, member) in self.members.iter().enumerate() {
            if member.volume.target.is_none() {
                continue;
            }
            started[i] = true;
            for command in &self.quiesce.pre_hooks {
                let hook = self.hook(member, Phase::Pre, command);
                if let Err(err) = self.context.hooks.run(self.context, &hook).await {
                    warn!(volume.id = %member.volume.volume_id, error = %crate::error_chain(&err), "A pre-hook failed; the snapshot is not taken");
                    return Err((err, started));
                }
                records[i].hooks_run += 1;
            }
        }
        match self.declared(Phase::Pre, &started).await {
            Ok(ran) => {
                for (record, ran) in records.iter_mut().zip(ran) {
                    record.hooks_run += ran;
                }
            }
            Err(err) => {
                warn!(error = %crate::error_chain(&err), "A pre-hook failed; the snapshot is not taken");
                return Err((err, started));
            }
        }
        Ok(started)
    }

    /// Runs the post-hooks owed, last member first and each member's
    /// commands in reverse; a failure is noted, not fatal (the cut is
    /// taken or already failed).
    async fn post_hooks(&self, started: &[bool], records: &mut [QuiesceRecord]) {
        match self.declared(Phase::Post, started).await {
            Ok(ran) => {
                for (record, ran) in records.iter_mut().zip(ran) {
                    record.hooks_run += ran;
                }
            }
            Err(err) => {
                let error = crate::error_chain(&err);
                warn!(%error, "A post-hook failed");
                if let Some(i) = started.iter().position(|s| *s) {
                    records[i].notes.push(format!("post-hook failed: {error}"));
                }
            }
        }
        for (i, member) in self.members.iter().enumerate().rev() {
            if !started[i] {
                continue;
            }
            for command in self.quiesce.post_hooks.iter().rev() {
                let hook = self.hook(member, Phase::Post, command);
                match self.context.hooks.run(self.context, &hook).await {
                    Ok(()) => records[i].hooks_run += 1,
                    Err(err) => {
                        let error = crate::error_chain(&err);
                        warn!(volume.id = %member.volume.volume_id, %error, "A post-hook failed");
                        records[i].notes.push(format!("post-hook failed: {error}"));
                    }
                }
            }
        }
    }

    /// Runs the hooks the applications of the `started` members declare
    /// for `phase`, once per application; returns how many ran per member.
    async fn declared(&self, phase: Phase, started: &[bool]) -> Result<Vec<u32>, Error> {
        let (indexes, volumes): (Vec<usize>, Vec<&VolumeRecord>) = self
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| started[*i])
            .map(|(i, m)| (i, m.volume))
            .unzip();
        let mut ran = vec![0; self.members.len()];
        if volumes.is_empty() {
            return Ok(ran);
        }
        let counts = self
            .context
            .hooks
            .run_declared(self.context, &volumes, phase, self.quiesce.hook_timeout)
            .await?;
        for (i, count) in indexes.into_iter().zip(counts) {
            ran[i] = count;
        }
        Ok(ran)
    }

    fn hook<'m>(&'m self, member: &'m Member<'m>, phase: Phase, command: &'m str) -> HookCall<'m> {
        HookCall {
            volume: member.volume,
            snapshot_id: self.freeze_id,
            phase,
            command,
            timeout: self.quiesce.hook_timeout,
        }
    }

    /// Freezes every published member at once; returns which are frozen,
    /// with the first error if any freeze failed.
    async fn freeze_all(
        &self,
        records: &mut [QuiesceRecord],
    ) -> Result<Vec<bool>, (Error, Vec<bool>)> {
        let mut frozen = vec![false; self.members.len()];
        if !self.quiesce.freeze {
            return Ok(frozen);
        }
        let answers = join_all(self.members.iter().map(|m| self.freeze(m))).await;
        let mut first_error = None;
        for (i, answer) in answers.into_iter().enumerate() {
            match answer {
                Ok(None) => {}
                Ok(Some(response)) if response.frozen => {
                    frozen[i] = true;
                    records[i].frozen = true;
                }
                Ok(Some(response)) => {
                    info!(volume.id = %self.members[i].volume.volume_id, reason = %response.skipped_reason, "Not frozen");
                    records[i]
                        .notes
                        .push(format!("not frozen: {}", response.skipped_reason));
                }
                Err(err) => {
                    first_error.get_or_insert(err);
                }
            }
        }
        match first_error {
            Some(err) => Err((err, frozen)),
            None => Ok(frozen),
        }
    }

    /// Freezes one member; `None` for an unpublished one.
    async fn freeze(
        &self,
        member: &Member<'_>,
    ) -> Result<Option<agent_pb::FreezeFilesystemResponse>, Error> {
        if member.volume.target.is_none() {
            return Ok(None);
        }
        let volume_id = &member.volume.volume_id;
        let (node, address) = target_agent(self.context, member.volume).await?;
        let request = agent_pb::FreezeFilesystemRequest {
            volume_id: volume_id.clone(),
            freeze_id: self.freeze_id.to_string(),
            // The node plugin's own bound: the freeze, then the cut's
            // barrier phase, each within the deadline.
            deadline_ms: millis(self.deadline.saturating_mul(2)),
        };
        let mut client = self.context.agents.quiesce(&address)?;
        let answer = tokio::time::timeout(self.deadline, client.freeze_filesystem(request)).await;
        match answer {
            Ok(Ok(response)) => Ok(Some(response.into_inner())),
            Ok(Err(status)) => Err(AgentError::new(
                &node,
                format!("Freezing the filesystem of volume {volume_id}"),
                status,
            )
            .into()),
            Err(_) => {
                // It may still freeze: the thaw below (and the node
                // plugin's own deadline) undo that.
                self.thaw(member).await;
                Err(Error::CutDeadline {
                    volume: volume_id.clone(),
                    deadline: self.deadline,
                    why: "the filesystem did not freeze in time".to_string(),
                })
            }
        }
    }

    /// Thaws every frozen member; a thaw that fails is noted (the node
    /// plugin thaws at its deadline).
    async fn thaw_all(&self, frozen: &[bool], records: &mut [QuiesceRecord]) {
        let thaws = self
            .members
            .iter()
            .zip(frozen)
            .filter(|(_, frozen)| **frozen)
            .map(|(m, _)| self.thaw(m));
        let failures = join_all(thaws).await;
        for (i, failure) in frozen
            .iter()
            .enumerate()
            .filter(|(_, f)| **f)
            .map(|(i, _)| i)
            .zip(failures)
        {
            if let Some(failure) = failure {
                records[i].notes.push(failure);
            }
        }
    }

    /// Thaws one member; the note to keep if it failed.
    async fn thaw(&self, member: &Member<'_>) -> Option<String> {
        let volume_id = &member.volume.volume_id;
        let result: Result<bool, Error> = async {
            let (node, address) = target_agent(self.context, member.volume).await?;
            let request = agent_pb::ThawFilesystemRequest {
                volume_id: volume_id.clone(),
                freeze_id: self.freeze_id.to_string(),
            };
            let response = self
                .context
                .agents
                .quiesce(&address)?
                .thaw_filesystem(request)
                .await
                .map_err(|status| {
                    AgentError::new(&node, format!("Thawing volume {volume_id}"), status)
                })?;
            Ok(response.into_inner().was_frozen)
        }
        .await;
        match result {
            Ok(true) => None,
            Ok(false) => {
                Some("thawed by the node plugin at its deadline, before the thaw came".to_string())
            }
            Err(err) => {
                let error = crate::error_chain(&err);
                warn!(volume.id = %volume_id, %error, "Cannot thaw; the node plugin thaws at its deadline");
                Some(format!(
                    "thaw failed (the node plugin thaws at its deadline): {error}"
                ))
            }
        }
    }
}

/// The node and agent address of a published volume's target.
async fn target_agent(context: &Context, volume: &VolumeRecord) -> Result<(String, String), Error> {
    let node = volume
        .target
        .as_ref()
        .map(|t| t.node_id.clone())
        .ok_or_else(|| super::invalid(format!("volume {} is not published", volume.volume_id)))?;
    let address = cut::agent_address(context, &node).await?;
    Ok((node, address))
}

fn millis(duration: Duration) -> u32 {
    u32::try_from(duration.as_millis()).unwrap_or(u32::MAX)
}
