//! Bearer-token authentication of the Sluice API (`--auth-token-file`).

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use tonic::{Request, Status};

/// Checks `authorization: Bearer <token>` against a file's content, read again
/// whenever the file's modification time changes. Without a file, every call passes.
#[derive(Clone)]
pub struct BearerToken {
    file: Option<PathBuf>,
    cached: Arc<Mutex<Option<(SystemTime, String)>>>,
}

impl BearerToken {
    pub fn new(file: Option<PathBuf>) -> Self {
        Self { file, cached: Arc::default() }
    }

    /// The expected token, or an error when the file cannot be read (the call is refused).
    fn expected(&self, file: &PathBuf) -> Result<String, Status> {
        let unreadable = |e: std::io::Error| {
            tracing::error!(file = %file.display(), %e, "cannot read the API token file; refusing calls");
            Status::unavailable("the coordinator cannot read its API token")
        };
        let modified = std::fs::metadata(file).and_then(|m| m.modified()).map_err(unreadable)?;
        let mut cached = self.cached.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((at, token)) = cached.as_ref()
            && *at == modified
        {
            return Ok(token.clone());
        }
        let token = std::fs::read_to_string(file).map_err(unreadable)?.trim().to_string();
        if token.is_empty() {
            return Err(Status::unavailable("the coordinator's API token file is empty"));
        }
        *cached = Some((modified, token.clone()));
        Ok(token)
    }
}

impl tonic::service::Interceptor for BearerToken {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let Some(file) = &self.file else { return Ok(request) };
        let expected = self.expected(file)?;
        let given = request.metadata().get("authorization").and_then(|v| v.to_str().ok()).unwrap_or_default();
        match given.strip_prefix("Bearer ") {
            Some(token) if constant_time_eq(token.trim().as_bytes(), expected.as_bytes()) => Ok(request),
            Some(_) => Err(Status::unauthenticated("the bearer token is not valid for this cluster")),
            None => {
                Err(Status::unauthenticated("this cluster requires a bearer token: pass --token or set SLUICE_TOKEN"))
            }
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}
