//! The agent's transport over real HTTP: a hyper client to each node's admin API.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use super::{AdminReply, AdminRequest, AdminTransport};

/// The admin API of live nodes, by base URL (`http://127.0.0.1:8080`).
#[derive(Debug, Clone)]
pub struct HttpTransport {
    targets: Vec<String>,
    admin_token: String,
    timeout: Duration,
    client: Client<HttpConnector, Full<Bytes>>,
}

impl HttpTransport {
    /// A transport to `targets` (base URLs without a trailing slash) with `admin_token`
    /// (whose name the audit log gives the agent's calls); each call waits at most `timeout`.
    pub fn new(targets: Vec<String>, admin_token: String, timeout: Duration) -> Self {
        let targets = targets.into_iter().map(|target| target.trim_end_matches('/').to_owned()).collect();
        Self {
            targets,
            admin_token,
            timeout,
            client: Client::builder(TokioExecutor::new()).build(HttpConnector::new()),
        }
    }

    async fn send_unbounded(&self, node: &str, request: AdminRequest) -> Result<AdminReply, String> {
        let mut builder = hyper::Request::builder()
            .method(request.method)
            .uri(format!("{node}{}", request.path))
            .header("authorization", format!("Bearer {}", self.admin_token));
        if request.body.is_some() {
            builder = builder.header("content-type", "application/json");
        }
        let request = builder
            .body(Full::new(Bytes::from(request.body.unwrap_or_default())))
            .map_err(|error| format!("bad request: {error}"))?;
        let response = self.client.request(request).await.map_err(|error| format!("no answer: {error}"))?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await.map_err(|error| format!("answer cut: {error}"))?.to_bytes();
        Ok(AdminReply { status, body: body.to_vec() })
    }
}

#[async_trait::async_trait(?Send)]
impl AdminTransport for HttpTransport {
    fn nodes(&self) -> Vec<String> {
        self.targets.clone()
    }

    async fn send(&self, node: &str, request: AdminRequest) -> Result<AdminReply, String> {
        match tokio::time::timeout(self.timeout, self.send_unbounded(node, request)).await {
            Ok(result) => result,
            Err(_) => Err(format!("no answer within {} ms", self.timeout.as_millis())),
        }
    }
}
