//! The handle the rest of the broker uses for the controller group (group 0, cluster metadata):
//! open it, propose commands, watch the state. Nothing outside `raft/` sees an openraft type.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use openraft::BasicNode;
use tokio::sync::watch;
use weft_storage::{LogConfig, PartitionLog};

use crate::meta::Metadata;

use super::{
    CONTROLLER_GROUP, Command, ControllerCommand, ControllerResponse, ControllerState,
    ControllerStateMachine, Flusher, LogStore, Network, NodeId, Raft, Response,
};
use crate::error::BrokerError;

/// The controller group on this node.
#[derive(Clone)]
pub struct ControllerGroup {
    raft: Raft,
    sm: ControllerStateMachine,
}

impl std::fmt::Debug for ControllerGroup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControllerGroup").finish_non_exhaustive()
    }
}

impl ControllerGroup {
    /// Opens the controller log in `dir`, starts the group (initialising a single-voter cluster
    /// on first start), waits until this node leads it and has applied its log.
    pub async fn open(
        dir: &Path,
        node_id: NodeId,
        peer_address: String,
        meta: Metadata,
        raft_config: Arc<openraft::Config>,
        flusher: Flusher,
    ) -> anyhow::Result<ControllerGroup> {
        let dir = dir.to_path_buf();
        let log = tokio::task::spawn_blocking(move || {
            PartitionLog::open(
                dir,
                LogConfig {
                    sync_listener: crate::sync_journal::listener(),
                    ..LogConfig::default()
                },
            )
        })
        .await??;
        let store = LogStore::new(CONTROLLER_GROUP, log, meta, flusher)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let sm = ControllerStateMachine::new();
        let raft = Raft::new(node_id, raft_config, Network, store, sm.clone()).await?;
        if !raft.is_initialized().await? {
            let members = BTreeMap::from([(node_id, BasicNode::new(peer_address))]);
            raft.initialize(members).await?;
        }
        raft.wait(Some(Duration::from_secs(30)))
            .current_leader(node_id, "controller leadership")
            .await
            .map_err(|e| anyhow::anyhow!("this node did not become controller leader: {e}"))?;
        // Apply everything already in the controller log before serving.
        raft.ensure_linearizable()
            .await
            .map_err(|e| anyhow::anyhow!("controller not ready: {e}"))?;
        Ok(ControllerGroup { raft, sm })
    }

    /// The applied state (topics).
    pub fn state(&self) -> Arc<ControllerState> {
        self.sm.state()
    }

    /// Watches the applied state.
    pub fn watch(&self) -> watch::Receiver<Arc<ControllerState>> {
        self.sm.watch()
    }

    /// The controller's leader.
    pub fn leader(&self) -> Option<NodeId> {
        self.raft.metrics().borrow().current_leader
    }

    /// Proposes a command and waits (up to `timeout`) until it is applied.
    pub async fn propose(
        &self,
        command: ControllerCommand,
        timeout: Duration,
    ) -> Result<ControllerResponse, BrokerError> {
        let write = self.raft.client_write(Command::Controller(command));
        match tokio::time::timeout(timeout, write).await {
            Err(_) => Err(BrokerError::Timeout(
                "controller did not commit in time".into(),
            )),
            Ok(Err(e)) => Err(BrokerError::Unavailable {
                reason: format!("controller: {e}"),
                leader: self.leader(),
            }),
            Ok(Ok(response)) => match response.data {
                Response::Controller(r) => Ok(r),
                other => Err(BrokerError::Internal(format!(
                    "unexpected controller response {other:?}"
                ))),
            },
        }
    }

    /// Stops the group.
    pub async fn shutdown(&self) {
        if let Err(e) = self.raft.shutdown().await {
            tracing::warn!("controller shutdown: {e}");
        }
    }
}
