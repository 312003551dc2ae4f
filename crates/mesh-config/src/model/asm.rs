//! istio.alibabacloud.com/v1beta1 ASMEgressTrafficPolicy (seed 003).
use super::Labels;
use serde::Deserialize;

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct AsmEgressTrafficPolicySpec {
    #[serde(default)]
    pub by_egress_gateway: Option<ByEgressGateway>,
    #[serde(default)]
    pub egress_rules: Vec<EgressRule>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ByEgressGateway {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub port: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressRule {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub from: Vec<EgressFrom>,
    #[serde(default)]
    pub to: Vec<EgressTo>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressFrom {
    pub namespace: String,
    #[serde(default)]
    pub workload_selector: Labels,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressTo {
    pub name: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    pub port: EgressPort,
    #[serde(default)]
    pub by_egress_gateway: Option<ByEgressGateway>,
    #[serde(default)]
    pub https_upgrade: Option<HttpsUpgrade>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EgressPort {
    #[serde(default)]
    pub name: Option<String>,
    pub number: u32,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct HttpsUpgrade {
    #[serde(default)]
    pub enabled: bool,
    #[serde(default)]
    pub port: Option<u32>,
}
