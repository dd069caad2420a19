//! Talking to a cluster's coordinators: the client library behind `sluice
//! submit`, `status`, `list`, `stop` and `resume`.
//!
//! Several coordinator URLs may be given; each call goes to the first that
//! answers, so a client keeps working when one coordinator is down.

use std::time::Duration;

use sluice_proto::pb::v1::sluice_client::SluiceClient;
use sluice_proto::pb::v1::{
    GetStatusRequest, ListPipelinesRequest, PipelineState, PipelineStatus, ResumePipelineRequest, StopPipelineRequest,
    SubmitPipelineRequest, SubmitPipelineResponse, WatchProgressRequest,
};
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

/// Where `sluice` finds the cluster when neither `--coordinator` nor `SLUICE_COORDINATOR` says.
pub const DEFAULT_COORDINATOR: &str = "http://127.0.0.1:7070";

/// A failed call, ready to print on one line.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    #[error("cannot reach the coordinator at {urls}: {reason}")]
    Unreachable { urls: String, reason: String },
    #[error("{message}")]
    Rejected { code: Code, message: String },
}

impl ClientError {
    /// Exit code: 2 for a request the user must fix (invalid pipeline), 1 otherwise.
    pub fn exit_code(&self) -> u8 {
        match self {
            ClientError::Rejected { code: Code::InvalidArgument, .. } => 2,
            _ => 1,
        }
    }

    fn from_status(status: Status, url: &str) -> Self {
        match status.code() {
            Code::Unavailable | Code::Unknown | Code::Internal
                if status.message().contains("transport") || status.message().contains("h2 protocol error") =>
            {
                let chain = match std::error::Error::source(&status) {
                    Some(source) => format!("{}: {}", status.message(), error_chain(source)),
                    None => status.message().to_string(),
                };
                ClientError::Unreachable { urls: url.to_string(), reason: transport_reason(url, &chain) }
            }
            code => ClientError::Rejected { code, message: status.message().to_string() },
        }
    }
}

/// What a transport error means for a user of `url`: [`short_reason`], or,
/// for a connection the coordinator closed at once, the usual TLS mismatches.
fn transport_reason(url: &str, chain: &str) -> String {
    let lower = chain.to_ascii_lowercase();
    let closed = ["broken pipe", "connection reset", "connection closed", "h2 protocol error"];
    if closed.iter().any(|s| lower.contains(s)) {
        let hint = if url.starts_with("https://") {
            "if it requires client certificates, pass --client-cert and --client-key"
        } else {
            "if it serves TLS, use an https:// address"
        };
        return format!("the coordinator closed the connection ({hint})");
    }
    short_reason(chain)
}

/// The innermost, most telling part of a transport error chain.
fn short_reason(message: &str) -> String {
    let lower = message.to_ascii_lowercase();
    if lower.contains("connection refused") {
        "connection refused (is sluice-coordinator running?)".into()
    } else if lower.contains("timed out") || lower.contains("deadline") {
        "timed out".into()
    } else if lower.contains("dns") || lower.contains("resolve") {
        "unknown host".into()
    } else if lower.contains("unknownissuer") {
        "its TLS certificate is not signed by a CA this client trusts (pass the CA with --ca-cert or SLUICE_CA_CERT)"
            .into()
    } else if lower.contains("notvalidforname") {
        "its TLS certificate is not valid for this host name".into()
    } else if lower.contains("expired") && lower.contains("certificate") {
        "its TLS certificate has expired".into()
    } else if lower.contains("certificaterequired") || lower.contains("certificate required") {
        "it requires a client certificate (pass --client-cert and --client-key)".into()
    } else if lower.contains("badcertificate") || lower.contains("unknownca") || lower.contains("bad certificate") {
        "it does not accept this client certificate".into()
    } else {
        message.lines().next().unwrap_or(message).to_string()
    }
}

#[derive(Clone)]
pub struct Remote {
    urls: Vec<String>,
    auth: Auth,
    /// For `https://` addresses.
    tls: Option<tonic::transport::ClientTlsConfig>,
}

/// Sends `authorization: Bearer <token>` with every call when a token is set.
#[derive(Clone, Default)]
pub struct Auth(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut request: tonic::Request<()>) -> Result<tonic::Request<()>, Status> {
        if let Some(value) = &self.0 {
            request.metadata_mut().insert("authorization", value.clone());
        }
        Ok(request)
    }
}

type Client = SluiceClient<tonic::codegen::InterceptedService<Channel, Auth>>;

impl Remote {
    /// `urls`: comma-separated coordinator addresses (`http://host:7070`).
    pub fn new(urls: &str) -> Self {
        let urls = urls
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| if u.contains("://") { u.to_string() } else { format!("http://{u}") })
            .collect();
        Self { urls, auth: Auth::default(), tls: None }
    }

    /// Trusts this CA (the system's roots by default) and presents this client
    /// certificate, if any, to `https://` coordinators. A CA or a certificate
    /// given for `http://` addresses is an error: the connection would not use it.
    pub fn with_tls(mut self, files: &sluice_proto::tls::ClientTlsFiles) -> Result<Self, String> {
        let https = self.urls.iter().any(|u| u.starts_with("https://"));
        if files.is_set() && !https {
            return Err("a CA or client certificate is given, but the coordinator address is not https://".into());
        }
        if https {
            self.tls = Some(files.config()?);
        }
        Ok(self)
    }

    /// Authenticates every call with this bearer token (a coordinator started
    /// with `--auth-token-file` requires one).
    pub fn with_token(mut self, token: Option<&str>) -> Result<Self, String> {
        self.auth = match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Auth(None),
            Some(token) => Auth(Some(
                format!("Bearer {token}").parse().map_err(|_| "the token has characters a header cannot carry")?,
            )),
        };
        Ok(self)
    }

    /// Connects to the first coordinator that answers.
    async fn client(&self) -> Result<Client, ClientError> {
        let mut reasons = Vec::new();
        for url in &self.urls {
            match connect(url, &self.auth, self.tls.as_ref()).await {
                Ok(client) => return Ok(client),
                Err(reason) => reasons.push(reason),
            }
        }
        let reason = if reasons.iter().all(|r| *r == reasons[0]) { reasons[0].clone() } else { reasons.join("; ") };
        Err(ClientError::Unreachable { urls: self.urls.join(", "), reason })
    }

    /// Runs `call` on the first coordinator that answers; moves on to the next
    /// one when a coordinator cannot be reached or cannot reach etcd.
    async fn call<T, F, Fut>(&self, call: F) -> Result<T, ClientError>
    where
        F: Fn(Client) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let mut last = None;
        for url in &self.urls {
            let client = match connect(url, &self.auth, self.tls.as_ref()).await {
                Ok(client) => client,
                Err(reason) => {
                    last = Some(ClientError::Unreachable { urls: url.clone(), reason });
                    continue;
                }
            };
            match call(client).await {
                Ok(response) => return Ok(response.into_inner()),
                Err(status) => {
                    let error = ClientError::from_status(status, url);
                    let try_next = matches!(error, ClientError::Unreachable { .. })
                        || matches!(error, ClientError::Rejected { code: Code::Unavailable, .. });
                    if !try_next {
                        return Err(error);
                    }
                    last = Some(error);
                }
            }
        }
        Err(last.unwrap_or(ClientError::Unreachable { urls: String::new(), reason: "no coordinator given".into() }))
    }

    pub async fn submit(
        &self,
        yaml: String,
        base_dir: String,
        replace: bool,
    ) -> Result<SubmitPipelineResponse, ClientError> {
        self.call(|mut c| {
            let request = SubmitPipelineRequest { yaml: yaml.clone(), base_dir: base_dir.clone(), replace };
            async move { c.submit_pipeline(request).await }
        })
        .await
    }

    pub async fn status(&self, name: &str) -> Result<PipelineStatus, ClientError> {
        self.call(|mut c| {
            let request = GetStatusRequest { name: name.to_string() };
            async move { c.get_status(request).await }
        })
        .await
    }

    pub async fn list(&self) -> Result<Vec<PipelineStatus>, ClientError> {
        self.call(|mut c| async move { c.list_pipelines(ListPipelinesRequest {}).await }).await.map(|r| r.pipelines)
    }

    pub async fn stop(&self, name: &str) -> Result<PipelineStatus, ClientError> {
        self.call(|mut c| {
            let request = StopPipelineRequest { name: name.to_string() };
            async move { c.stop_pipeline(request).await }
        })
        .await
    }

    pub async fn resume(&self, name: &str) -> Result<PipelineStatus, ClientError> {
        self.call(|mut c| {
            let request = ResumePipelineRequest { name: name.to_string() };
            async move { c.resume_pipeline(request).await }
        })
        .await
    }

    /// Follows a pipeline's status until `done` says so, calling `each` on every
    /// update. Reconnects (to any coordinator) when a stream breaks; gives up
    /// after `patience` without any coordinator answering.
    pub async fn watch(
        &self,
        name: &str,
        patience: Duration,
        mut each: impl FnMut(&PipelineStatus),
        done: impl Fn(&PipelineStatus) -> bool,
    ) -> Result<PipelineStatus, ClientError> {
        let mut unreachable_since: Option<std::time::Instant> = None;
        loop {
            let attempt = async {
                let mut client = self.client().await?;
                let mut stream = client
                    .watch_progress(WatchProgressRequest { name: name.to_string() })
                    .await
                    .map_err(|s| ClientError::from_status(s, "coordinator"))?
                    .into_inner();
                loop {
                    match stream.message().await {
                        Ok(Some(status)) => {
                            each(&status);
                            if done(&status) {
                                return Ok(Some(status));
                            }
                        }
                        Ok(None) => return Ok(None),
                        Err(status) => return Err(ClientError::from_status(status, "coordinator")),
                    }
                }
            };
            match attempt.await {
                Ok(Some(status)) => return Ok(status),
                Ok(None) => unreachable_since = None,
                Err(ClientError::Rejected { code, message }) if code != Code::Unavailable => {
                    return Err(ClientError::Rejected { code, message });
                }
                Err(error) => {
                    let since = *unreachable_since.get_or_insert_with(std::time::Instant::now);
                    if since.elapsed() > patience {
                        return Err(error);
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}

/// Connects to one coordinator; the error is the reason, ready for [`ClientError::Unreachable`].
async fn connect(url: &str, auth: &Auth, tls: Option<&tonic::transport::ClientTlsConfig>) -> Result<Client, String> {
    let mut endpoint = Endpoint::from_shared(url.to_string())
        .map_err(|e| format!("{url}: invalid address ({e})"))?
        .connect_timeout(Duration::from_secs(3))
        .timeout(Duration::from_secs(30));
    if let Some(tls) = tls.filter(|_| url.starts_with("https://")) {
        endpoint = endpoint.tls_config(tls.clone()).map_err(|e| format!("{url}: TLS: {}", error_chain(&e)))?;
    }
    let channel = endpoint.connect().await.map_err(|e| transport_reason(url, &error_chain(&e)))?;
    Ok(SluiceClient::with_interceptor(channel, auth.clone()))
}

/// The error and its causes, each said once (a cause that repeats its wrapper's text is left out).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let said = cause.to_string();
        if !text.contains(&said) {
            text.push_str(": ");
            text.push_str(&said);
        }
        source = cause.source();
    }
    text
}

pub fn state_name(state: i32) -> &'static str {
    match PipelineState::try_from(state).unwrap_or(PipelineState::Unspecified) {
        PipelineState::Unspecified => "unknown",
        PipelineState::Pending => "pending",
        PipelineState::Running => "running",
        PipelineState::Waiting => "waiting",
        PipelineState::Completed => "completed",
        PipelineState::Failed => "failed",
        PipelineState::Stopping => "stopping",
        PipelineState::Stopped => "stopped",
    }
}

/// A status as JSON, for `sluice status --json` and scripts.
pub fn status_json(status: &PipelineStatus) -> serde_json::Value {
    serde_json::json!({
        "name": status.name,
        "state": state_name(status.state),
        "generation": status.generation,
        "trigger": status.trigger,
        "leader": status.leader,
        "last_error": status.last_error,
        "updated_at_ms": status.updated_at_ms,
        "workers": status.workers.iter().map(|w| serde_json::json!({"id": w.id, "slots": w.slots})).collect::<Vec<_>>(),
        "flows": status.flows.iter().map(|f| serde_json::json!({
            "name": f.name,
            "table": f.table,
            "batches_committed": f.batches_committed,
            "last_delta_version": (f.last_delta_version >= 0).then_some(f.last_delta_version),
            "files_done": f.files_done,
            "bytes_done": f.bytes_done,
            "rows_done": f.rows_done,
            "files_pending": f.files_pending,
            "bytes_pending": f.bytes_pending,
            "current_batch": (f.current_batch > 0).then_some(f.current_batch),
            "caught_up": f.caught_up,
            "last_error": f.last_error,
            "quarantine": f.quarantine,
            "quarantined_rows": f.quarantined_rows,
            "malformed_rows": f.malformed_rows,
            "unreadable_files": f.unreadable_files,
            "expectations_failed": f.expectations_failed,
            "schema_version": (f.schema_version > 0).then_some(f.schema_version),
            "schema": (!f.schema.is_empty()).then_some(&f.schema),
            "schema_added": f.schema_added,
            "tasks": f.tasks.iter().map(|t| serde_json::json!({
                "batch": t.batch, "index": t.index, "worker": t.worker, "files": t.files,
                "bytes": t.bytes, "attempt": t.attempt, "done": t.done,
            })).collect::<Vec<_>>(),
        })).collect::<Vec<_>>(),
    })
}

/// A status as text for people.
pub fn status_text(status: &PipelineStatus) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "pipeline {}: {} (generation {}, {})",
        status.name,
        state_name(status.state),
        status.generation,
        if status.trigger.is_empty() { "?" } else { &status.trigger }
    );
    if !status.leader.is_empty() {
        let _ = writeln!(out, "leader: {}", status.leader);
    }
    let slots: u32 = status.workers.iter().map(|w| w.slots).sum();
    let _ = writeln!(out, "workers: {} ({} slots)", status.workers.len(), slots);
    for f in &status.flows {
        let version = if f.last_delta_version >= 0 { f.last_delta_version.to_string() } else { "-".into() };
        let _ = writeln!(
            out,
            "flow {}: {} batches, {} files, {} rows, {} committed (Delta version {version}); pending {} files, {}{}",
            f.name,
            f.batches_committed,
            f.files_done,
            f.rows_done,
            bytesize::ByteSize(f.bytes_done),
            f.files_pending,
            bytesize::ByteSize(f.bytes_pending),
            if f.caught_up { "; caught up" } else { "" },
        );
        let _ = writeln!(out, "  table: {}", f.table);
        if f.schema_version > 0 {
            let added = if f.schema_added.is_empty() {
                String::new()
            } else {
                format!(" (last added: {})", f.schema_added.join(", "))
            };
            let _ = writeln!(out, "  schema version {}{added}: {}", f.schema_version, f.schema);
        }
        if f.quarantined_rows > 0 {
            let _ = writeln!(
                out,
                "  quarantined: {} rows ({} malformed records, {} unreadable files) -> {}",
                f.quarantined_rows, f.malformed_rows, f.unreadable_files, f.quarantine
            );
        }
        if !f.expectations_failed.is_empty() {
            let counts: Vec<String> =
                f.expectations_failed.iter().map(|(name, failed)| format!("{name}: {failed} failed")).collect();
            let _ = writeln!(out, "  expectations: {}", counts.join(", "));
        }
        for t in &f.tasks {
            let state = if t.done {
                "done".to_string()
            } else if t.worker.is_empty() {
                "waiting for a worker".to_string()
            } else {
                format!("running on {}", t.worker)
            };
            let _ = writeln!(
                out,
                "  batch {} task {}: {} files, {}, attempt {}: {state}",
                t.batch,
                t.index,
                t.files,
                bytesize::ByteSize(t.bytes),
                t.attempt + 1
            );
        }
        if !f.last_error.is_empty() {
            let _ = writeln!(out, "  last error: {}", f.last_error);
        }
    }
    if !status.last_error.is_empty() {
        let _ = writeln!(out, "error: {}", status.last_error);
    }
    out
}
