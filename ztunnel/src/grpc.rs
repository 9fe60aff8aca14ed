//! Connections to the control plane (istiod, or the one in this repo): TLS
//! checked against the control plane's root, the node's bearer token and
//! cluster id on every request, and extra headers, as Istio's ztunnel sends
//! them. Shared by the xDS client and the CA client.

use std::{path::PathBuf, time::Duration};

use tonic::{
    metadata::{AsciiMetadataKey, AsciiMetadataValue},
    service::interceptor::InterceptedService,
    transport::{Certificate, Channel, ClientTlsConfig, Endpoint},
    Request, Status,
};

#[derive(Debug, thiserror::Error)]
pub enum GrpcError {
    #[error("control plane address `{address}`: {message}")]
    Address { address: String, message: String },
    #[error("root certificate {}: {message}", path.display())]
    Root { path: PathBuf, message: String },
    #[error("header {name}: {message}")]
    Header { name: String, message: String },
}

/// Where a control-plane service is and how to present ourselves to it.
#[derive(Debug, Clone)]
pub struct ControlPlaneEndpoint {
    /// `https://host:port`.
    pub address: String,
    /// PEM roots the server's certificate must chain to (re-read at each
    /// connect, so a rotated root applies without a restart).
    pub root_cert: PathBuf,
    /// Name to verify the server's certificate against instead of the
    /// address's host (`ALT_XDS_HOSTNAME`, `ALT_CA_HOSTNAME`).
    pub alt_hostname: Option<String>,
    /// A file holding the bearer token (`AUTH_TOKEN`), re-read at each
    /// request. None: no token is sent.
    pub token: Option<PathBuf>,
    /// Sent as the `clusterid` header, as Istio's ztunnel does.
    pub cluster_id: String,
    /// Extra headers (`XDS_HEADER_*`, `CA_HEADER_*`).
    pub headers: Vec<(String, String)>,
}

/// A channel whose every request carries the token and headers.
pub type AuthChannel = InterceptedService<Channel, Authenticator>;

impl ControlPlaneEndpoint {
    /// A channel to the service. Connects lazily: errors of the connection
    /// itself surface on the first call.
    pub fn channel(&self) -> Result<AuthChannel, GrpcError> {
        let address_err = |message: String| GrpcError::Address {
            address: self.address.clone(),
            message,
        };
        let endpoint =
            Endpoint::from_shared(self.address.clone()).map_err(|e| address_err(e.to_string()))?;
        let host = endpoint
            .uri()
            .host()
            .map(str::to_string)
            .ok_or_else(|| address_err("no host".into()))?;
        if endpoint.uri().scheme_str() != Some("https") {
            return Err(address_err(
                "must be https://: the control plane is only spoken to over TLS".into(),
            ));
        }
        let root_pem = std::fs::read(&self.root_cert).map_err(|e| GrpcError::Root {
            path: self.root_cert.clone(),
            message: e.to_string(),
        })?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(root_pem))
            .domain_name(self.alt_hostname.clone().unwrap_or(host));
        let channel = endpoint
            .tls_config(tls)
            .map_err(|e| address_err(e.to_string()))?
            .connect_timeout(Duration::from_secs(5))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .keep_alive_while_idle(true)
            .connect_lazy();
        Ok(InterceptedService::new(channel, self.authenticator()?))
    }

    fn authenticator(&self) -> Result<Authenticator, GrpcError> {
        let mut headers = Vec::new();
        for (name, value) in &self.headers {
            let err = |message: String| GrpcError::Header {
                name: name.clone(),
                message,
            };
            let key = AsciiMetadataKey::from_bytes(name.to_ascii_lowercase().as_bytes())
                .map_err(|e| err(e.to_string()))?;
            let value =
                AsciiMetadataValue::try_from(value.as_str()).map_err(|e| err(e.to_string()))?;
            headers.push((key, value));
        }
        let cluster_id = AsciiMetadataValue::try_from(self.cluster_id.as_str()).map_err(|e| {
            GrpcError::Header {
                name: "clusterid".into(),
                message: e.to_string(),
            }
        })?;
        Ok(Authenticator {
            token: self.token.clone(),
            cluster_id,
            headers,
        })
    }
}

/// Adds the bearer token, the cluster id and the extra headers to every
/// request.
#[derive(Clone)]
pub struct Authenticator {
    token: Option<PathBuf>,
    cluster_id: AsciiMetadataValue,
    headers: Vec<(AsciiMetadataKey, AsciiMetadataValue)>,
}

impl tonic::service::Interceptor for Authenticator {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        let metadata = request.metadata_mut();
        if let Some(path) = &self.token {
            // Re-read each time: projected tokens are rotated on disk.
            // A local problem, not the server's answer: not Unauthenticated.
            let token = std::fs::read_to_string(path).map_err(|e| {
                Status::failed_precondition(format!(
                    "reading the token AUTH_TOKEN {}: {e}",
                    path.display()
                ))
            })?;
            let value =
                AsciiMetadataValue::try_from(format!("Bearer {}", token.trim())).map_err(|_| {
                    Status::failed_precondition(format!(
                        "the token in AUTH_TOKEN {} is not ASCII",
                        path.display()
                    ))
                })?;
            metadata.insert("authorization", value);
        }
        metadata.insert("clusterid", self.cluster_id.clone());
        for (key, value) in &self.headers {
            metadata.insert(key.clone(), value.clone());
        }
        Ok(request)
    }
}

/// A gRPC failure in words an operator can act on: the code, the message,
/// the transport's cause, and what to check. `root_var` and `hostname_var`
/// name the settings that decide whether the server is trusted.
pub fn describe(status: &tonic::Status, root_var: &str, hostname_var: &str) -> String {
    use std::error::Error;
    let mut message = format!("{:?}: {}", status.code(), status.message());
    let mut source = status.source();
    while let Some(cause) = source {
        // Transport errors repeat their cause in their own text.
        let cause_text = cause.to_string();
        if !message.contains(&cause_text) {
            message.push_str(&format!(": {cause_text}"));
        }
        source = cause.source();
    }
    if status.code() == tonic::Code::Unauthenticated {
        format!("the control plane refused this node ({message}); check AUTH_TOKEN")
    } else if status.code() == tonic::Code::PermissionDenied {
        format!("the control plane refused the request ({message})")
    } else if message.contains("invalid peer certificate") {
        format!("{message}; the control plane's certificate is not trusted: check {root_var} (and {hostname_var} if it is reached by another name)")
    } else {
        message
    }
}
