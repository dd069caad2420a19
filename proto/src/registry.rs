//! What the cluster stores about submitted pipelines and its leader (see [`crate::keys`]).

use serde::{Deserialize, Serialize};

/// Whether a pipeline should run. Users change it with submit, stop and resume.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Desired {
    Running,
    Stopped,
}

/// A submitted pipeline: its spec as the user wrote it, and what they asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PipelineRecord {
    pub name: String,
    /// The pipeline file's text.
    pub yaml: String,
    /// Where relative paths in `yaml` resolve (absolute), if anywhere.
    pub base_dir: Option<String>,
    /// Bumped by every submit, replace and resume: a run belongs to one generation.
    pub generation: u64,
    pub desired: Desired,
    pub submitted_at_ms: i64,
}

/// The value of the leader key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LeaderValue {
    pub id: String,
    /// Where its gRPC API listens, as clients should dial it.
    pub address: String,
    /// The lease it holds leadership under; makes every term's value unique.
    pub lease: i64,
    /// Where its Ballista scheduler listens (`host:port`), which every
    /// worker's executor polls; `None` when it runs none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ballista: Option<String>,
}

impl PipelineRecord {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(bytes)
    }
}

impl LeaderValue {
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    pub fn decode(bytes: &[u8]) -> Option<Self> {
        serde_json::from_slice(bytes).ok()
    }

    /// `id at address`, for messages.
    pub fn describe(&self) -> String {
        format!("{} at {}", self.id, self.address)
    }
}
