//! Kubernetes core kinds: only the fields we use are read; everything else is ignored.
use super::{IntOrString, Labels, ObjectMeta};
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Namespace {
    #[serde(default)]
    pub metadata: ObjectMeta,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Service {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: ServiceSpec,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Vec<ServicePort>,
    #[serde(default, rename = "clusterIP")]
    pub cluster_ip: Option<String>,
    #[serde(default, rename = "clusterIPs")]
    pub cluster_ips: Vec<String>,
    #[serde(default)]
    pub selector: Option<Labels>,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ServicePort {
    #[serde(default)]
    pub name: Option<String>,
    pub port: u16,
    #[serde(default)]
    pub target_port: Option<IntOrString>,
    /// L4 protocol (TCP/UDP/SCTP).
    #[serde(default)]
    pub protocol: Option<String>,
    /// Application protocol (http, http2, grpc, tls, …); beats the port-name convention.
    #[serde(default)]
    pub app_protocol: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Pod {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: PodSpec,
    #[serde(default)]
    pub status: PodStatus,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodSpec {
    #[serde(default)]
    pub service_account_name: Option<String>,
    /// Deprecated alias of serviceAccountName, still emitted by some tools.
    #[serde(default)]
    pub service_account: Option<String>,
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub containers: Vec<Container>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Container {
    #[serde(default)]
    pub ports: Vec<ContainerPort>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ContainerPort {
    #[serde(default)]
    pub name: Option<String>,
    pub container_port: u16,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<PodIp>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct PodIp {
    pub ip: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ConfigMap {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub data: std::collections::BTreeMap<String, String>,
}

/// A `v1 Secret`: only what TLS origination reads (`type`, `data`, `stringData`). Key material
/// must never reach logs: `Debug` lists the keys, not the values.
#[derive(Clone, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Secret {
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default, rename = "type")]
    pub type_: Option<String>,
    /// Base64 values, as the API server stores them.
    #[serde(default)]
    pub data: std::collections::BTreeMap<String, String>,
    /// Plain-text values (write-only in Kubernetes, merged into `data`; they win on conflict).
    #[serde(default)]
    pub string_data: std::collections::BTreeMap<String, String>,
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Secret")
            .field("name", &self.metadata.name)
            .field("namespace", &self.metadata.namespace)
            .field("type", &self.type_)
            .field("data_keys", &self.data.keys().collect::<Vec<_>>())
            .field(
                "string_data_keys",
                &self.string_data.keys().collect::<Vec<_>>(),
            )
            .finish_non_exhaustive()
    }
}
