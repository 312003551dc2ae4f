//! MeshConfig, read from `data.mesh` of the ConfigMap `istio` in `istio-system`. Real mesh
//! configs carry dozens of fields (defaultConfig, accessLogFile, …): we read the ones we use and
//! ignore the rest, like the Kubernetes core kinds.
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MeshConfig {
    #[serde(default)]
    pub outbound_traffic_policy: Option<OutboundTrafficPolicy>,
    #[serde(default)]
    pub trust_domain: Option<String>,
    #[serde(default)]
    pub root_namespace: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboundTrafficPolicy {
    #[serde(default)]
    pub mode: Option<String>,
}
