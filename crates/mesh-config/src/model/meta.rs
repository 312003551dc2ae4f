use serde::Deserialize;
use std::collections::BTreeMap;

/// Labels / annotations. A BTreeMap keeps dumps and iteration deterministic.
pub type Labels = BTreeMap<String, String>;

/// `metadata`: only the fields we use; the many server-set fields (uid, resourceVersion,
/// managedFields, …) are ignored.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ObjectMeta {
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub namespace: Option<String>,
    #[serde(default)]
    pub labels: Labels,
    #[serde(default)]
    pub annotations: Labels,
    /// Set when the API server generated the name (pods of controllers).
    #[serde(default)]
    pub generate_name: Option<String>,
    #[serde(default)]
    pub owner_references: Vec<OwnerReference>,
}

/// `metadata.ownerReferences[]`: the fields a workload's name is derived from. Lenient, like
/// the rest of `metadata`: what is missing reads as empty.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OwnerReference {
    #[serde(default)]
    pub api_version: String,
    #[serde(default)]
    pub kind: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub controller: Option<bool>,
}

/// `{matchLabels: …}` (Istio WorkloadSelector and Kubernetes LabelSelector without expressions).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MatchLabels {
    #[serde(default)]
    pub match_labels: Labels,
}

/// Kubernetes LabelSelector (Gateway API allowedRoutes selector).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: Labels,
    #[serde(default)]
    pub match_expressions: Vec<LabelSelectorRequirement>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LabelSelectorRequirement {
    pub key: String,
    pub operator: String,
    #[serde(default)]
    pub values: Vec<String>,
}

/// An Istio / Gateway API object: strict at the top level and in `spec`; `status` is read only
/// when a kind uses it (Gateway addresses) and is otherwise ignored.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resource<S, St = serde::de::IgnoredAny> {
    pub api_version: String,
    pub kind: String,
    #[serde(default)]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: S,
    #[serde(default)]
    pub status: Option<St>,
}
