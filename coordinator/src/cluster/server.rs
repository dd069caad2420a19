//! The gRPC API (`proto/sluice/v1/sluice.proto`), served by every coordinator.
//!
//! Specs and status live in the coordination store, so a standby answers every
//! call as the leader would; writes take effect when the leader sees them.
//! Errors map to gRPC codes in one place: [`ApiError`]'s `From` impl.

use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use sluice_proto::keys::Keys;
use sluice_proto::kv::{KvError, KvStore};
use sluice_proto::pb::v1::sluice_server::Sluice;
use sluice_proto::pb::v1::{
    GetStatusRequest, ListPipelinesRequest, ListPipelinesResponse, PipelineState, PipelineStatus,
    ResumePipelineRequest, StopPipelineRequest, SubmitPipelineRequest, SubmitPipelineResponse, WatchProgressRequest,
};
use sluice_proto::registry::{Desired, PipelineRecord};
use sluice_proto::spec::parse_pipeline;
use tonic::{Request, Response, Status};

use super::leader::current_leader;
use super::status::{add_live_view, is_terminal, now_ms, pending_status, read_status};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("invalid pipeline: {0}")]
    InvalidPipeline(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("pipeline `{0}` already exists; submit with --replace to replace it")]
    AlreadyExists(String),
    #[error("no pipeline named `{0}`")]
    NotFound(String),
    #[error("{0}")]
    Unavailable(String),
    #[error("pipeline `{0}` changed while this request was handled; try again")]
    Conflict(String),
}

impl From<KvError> for ApiError {
    fn from(error: KvError) -> Self {
        ApiError::Unavailable(format!("the coordinator cannot reach etcd: {error}"))
    }
}

impl From<ApiError> for Status {
    fn from(error: ApiError) -> Self {
        let message = error.to_string();
        match error {
            ApiError::InvalidPipeline(_) | ApiError::InvalidArgument(_) => Status::invalid_argument(message),
            ApiError::AlreadyExists(_) => Status::already_exists(message),
            ApiError::NotFound(_) => Status::not_found(message),
            ApiError::Unavailable(_) => Status::unavailable(message),
            ApiError::Conflict(_) => Status::aborted(message),
        }
    }
}

#[derive(Clone)]
pub struct SluiceService {
    kv: Arc<dyn KvStore>,
    keys: Keys,
    policy: SubmitPolicy,
}

/// The largest pipeline file a submit may carry.
pub const MAX_PIPELINE_BYTES: usize = 1 << 20;

/// What this deployment accepts beyond a valid pipeline file.
#[derive(Debug, Clone, Default)]
pub struct SubmitPolicy {
    /// Every location must start with one of these; empty: any location.
    pub allowed_locations: Vec<String>,
}

impl SubmitPolicy {
    fn check(&self, spec: &sluice_proto::spec::PipelineSpec) -> Result<(), ApiError> {
        if self.allowed_locations.is_empty() {
            return Ok(());
        }
        for location in crate::pipeline_runner::locations(spec) {
            if !self.allowed_locations.iter().any(|prefix| location.as_str().starts_with(prefix.as_str())) {
                return Err(ApiError::InvalidPipeline(format!(
                    "{location} is outside the locations this deployment allows ({}); ask its operators, or use one of those",
                    self.allowed_locations.join(", ")
                )));
            }
        }
        Ok(())
    }
}

impl SluiceService {
    pub fn new(kv: Arc<dyn KvStore>, keys: Keys) -> Self {
        Self { kv, keys, policy: SubmitPolicy::default() }
    }

    pub fn with_policy(mut self, policy: SubmitPolicy) -> Self {
        self.policy = policy;
        self
    }

    async fn record(&self, name: &str) -> Result<(PipelineRecord, Vec<u8>), ApiError> {
        if name.is_empty() {
            return Err(ApiError::InvalidArgument("a pipeline name is required".into()));
        }
        let bytes = self.kv.get(&self.keys.pipeline(name)).await?.ok_or_else(|| ApiError::NotFound(name.into()))?;
        let record = PipelineRecord::decode(&bytes)
            .map_err(|e| ApiError::Unavailable(format!("the stored record of `{name}` is malformed: {e}")))?;
        Ok((record, bytes))
    }

    /// The status users see: the leader's, or pending for a generation no leader took up yet.
    async fn view(&self, record: &PipelineRecord) -> Result<PipelineStatus, ApiError> {
        let stored = read_status(self.kv.as_ref(), &self.keys, &record.name).await?;
        let mut status = match stored {
            Some(status) if status.generation == record.generation => status,
            _ => {
                let spec = parse_pipeline(&record.yaml, record.base_dir.as_deref().map(Path::new)).ok();
                pending_status(record, spec.as_ref())
            }
        };
        if record.desired == Desired::Stopped && !is_terminal(status.state) {
            status.state = PipelineState::Stopping as i32;
        }
        add_live_view(self.kv.as_ref(), &self.keys, &mut status).await?;
        if status.leader.is_empty() || !is_terminal(status.state) {
            status.leader =
                current_leader(self.kv.as_ref(), &self.keys).await?.map(|l| l.describe()).unwrap_or_default();
        }
        Ok(status)
    }

    async fn status_of(&self, name: &str) -> Result<PipelineStatus, ApiError> {
        let (record, _) = self.record(name).await?;
        self.view(&record).await
    }

    /// Waits until the status of `name` differs from `last` (but for its time
    /// stamp), and returns it. Rides out an unreachable store.
    async fn next_change(&self, name: &str, last: &PipelineStatus) -> Result<PipelineStatus, ApiError> {
        loop {
            // The store's revision before reading, so no change after the read is missed.
            // Any small listing carries it; the status key's is the smallest at hand.
            let revision = match self.kv.list(&self.keys.status(name)).await {
                Ok(listing) => listing.revision,
                Err(_) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match self.status_of(name).await {
                Ok(status) if same_progress(&status, last) => {}
                Ok(status) => return Ok(status),
                Err(ApiError::Unavailable(_)) => {
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
                Err(error) => return Err(error),
            }
            let _ = self.kv.wait_for_change(&self.keys.root_prefix(), revision, Duration::from_secs(2)).await;
        }
    }

    /// Rewrites a record with `change`, guarded on it being unchanged meanwhile.
    async fn update(
        &self,
        name: &str,
        mut change: impl FnMut(&mut PipelineRecord),
    ) -> Result<PipelineRecord, ApiError> {
        for _ in 0..5 {
            let (mut record, old) = self.record(name).await?;
            change(&mut record);
            let key = self.keys.pipeline(name);
            if self.kv.put_if_equal(&key, &old, &key, record.encode()).await? {
                return Ok(record);
            }
        }
        Err(ApiError::Conflict(name.into()))
    }

    async fn submit(&self, request: SubmitPipelineRequest) -> Result<SubmitPipelineResponse, ApiError> {
        let base_dir = (!request.base_dir.is_empty()).then(|| request.base_dir.clone());
        if let Some(dir) = &base_dir
            && !Path::new(dir).is_absolute()
        {
            return Err(ApiError::InvalidArgument(format!("base_dir must be an absolute path, not `{dir}`")));
        }
        if request.yaml.len() > MAX_PIPELINE_BYTES {
            return Err(ApiError::InvalidPipeline(format!(
                "the pipeline file is {} bytes; at most {MAX_PIPELINE_BYTES} are accepted",
                request.yaml.len()
            )));
        }
        let spec = parse_pipeline(&request.yaml, base_dir.as_deref().map(Path::new))
            .map_err(|e| ApiError::InvalidPipeline(e.to_string()))?;
        crate::pipeline_runner::preflight(&spec).map_err(|e| ApiError::InvalidPipeline(e.to_string()))?;
        self.policy.check(&spec)?;
        let record = PipelineRecord {
            name: spec.name.clone(),
            yaml: request.yaml,
            base_dir,
            generation: 1,
            desired: Desired::Running,
            submitted_at_ms: now_ms(),
        };
        let key = self.keys.pipeline(&spec.name);
        if self.kv.create_if_absent(&key, record.encode(), None).await? {
            return Ok(SubmitPipelineResponse { name: spec.name, generation: 1, replaced: false });
        }
        if !request.replace {
            return Err(ApiError::AlreadyExists(spec.name));
        }
        let replaced = self
            .update(&spec.name, |old| {
                let generation = old.generation + 1;
                *old = PipelineRecord { generation, ..record.clone() };
            })
            .await?;
        Ok(SubmitPipelineResponse { name: spec.name, generation: replaced.generation, replaced: true })
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<PipelineStatus, Status>> + Send>>;

#[tonic::async_trait]
impl Sluice for SluiceService {
    async fn submit_pipeline(
        &self,
        request: Request<SubmitPipelineRequest>,
    ) -> Result<Response<SubmitPipelineResponse>, Status> {
        Ok(Response::new(self.submit(request.into_inner()).await?))
    }

    async fn get_status(&self, request: Request<GetStatusRequest>) -> Result<Response<PipelineStatus>, Status> {
        Ok(Response::new(self.status_of(&request.into_inner().name).await?))
    }

    async fn list_pipelines(
        &self,
        _request: Request<ListPipelinesRequest>,
    ) -> Result<Response<ListPipelinesResponse>, Status> {
        let listing = self.kv.list(&self.keys.pipelines_prefix()).await.map_err(ApiError::from)?;
        let mut pipelines = Vec::with_capacity(listing.entries.len());
        for (_, value) in &listing.entries {
            if let Ok(record) = PipelineRecord::decode(value) {
                pipelines.push(self.view(&record).await?);
            }
        }
        Ok(Response::new(ListPipelinesResponse { pipelines }))
    }

    async fn stop_pipeline(&self, request: Request<StopPipelineRequest>) -> Result<Response<PipelineStatus>, Status> {
        let record = self.update(&request.into_inner().name, |r| r.desired = Desired::Stopped).await?;
        Ok(Response::new(self.view(&record).await?))
    }

    async fn resume_pipeline(
        &self,
        request: Request<ResumePipelineRequest>,
    ) -> Result<Response<PipelineStatus>, Status> {
        let record = self
            .update(&request.into_inner().name, |r| {
                r.desired = Desired::Running;
                r.generation += 1;
            })
            .await?;
        Ok(Response::new(self.view(&record).await?))
    }

    type WatchProgressStream = StatusStream;

    async fn watch_progress(
        &self,
        request: Request<WatchProgressRequest>,
    ) -> Result<Response<Self::WatchProgressStream>, Status> {
        let name = request.into_inner().name;
        let first = self.status_of(&name).await?;
        let updates = futures::stream::unfold(Some((self.clone(), name, first.clone())), |state| async move {
            let (service, name, last) = state?;
            match service.next_change(&name, &last).await {
                Ok(status) => Some((Ok(status.clone()), Some((service, name, status)))),
                Err(error) => Some((Err(Status::from(error)), None)),
            }
        });
        Ok(Response::new(Box::pin(futures::stream::once(async { Ok(first) }).chain(updates))))
    }
}

/// Equal but for the time stamp.
fn same_progress(a: &PipelineStatus, b: &PipelineStatus) -> bool {
    let mut a = a.clone();
    a.updated_at_ms = b.updated_at_ms;
    a == *b
}
