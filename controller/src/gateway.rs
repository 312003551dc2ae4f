//! The slice of `gateway.networking.k8s.io/v1` `Gateway` and `GatewayClass` this controller
//! reads.
//!
//! The Gateway API CRDs are not ours to define, so these are serde structs of only the fields we
//! need; unknown fields are ignored on read. We never write a spec: statuses are written as a
//! server-side apply of just our fields (see [`crate::reconcile`]).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, ObjectMeta};
use serde::{Deserialize, Serialize};

/// A Gateway API `Gateway`, reduced to what the waypoint controller uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Gateway {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewaySpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<GatewayStatus>,
}

/// `Gateway.spec`: only the class matters here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewaySpec {
    /// Required by the CRD; an empty string (a malformed object) matches no class.
    #[serde(default)]
    pub gateway_class_name: String,
}

/// `Gateway.status`, the fields this controller writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub addresses: Vec<GatewayStatusAddress>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

/// One entry of `Gateway.status.addresses`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewayStatusAddress {
    /// `IPAddress` or `Hostname` (the Gateway API default is `IPAddress`).
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    pub value: String,
}

impl k8s_openapi::Resource for Gateway {
    const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
    const GROUP: &'static str = "gateway.networking.k8s.io";
    const KIND: &'static str = "Gateway";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "gateways";
    type Scope = k8s_openapi::NamespaceResourceScope;
}

impl k8s_openapi::Metadata for Gateway {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

/// A Gateway API `GatewayClass` (cluster-scoped), reduced to what the waypoint controller uses.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct GatewayClass {
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: GatewayClassSpec,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<GatewayClassStatus>,
}

/// `GatewayClass.spec`: only the controller that implements the class matters here.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassSpec {
    /// Required (and immutable) in the CRD; an empty string (a malformed object) is nobody's.
    #[serde(default)]
    pub controller_name: String,
}

/// `GatewayClass.status`, the field this controller writes.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GatewayClassStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

impl k8s_openapi::Resource for GatewayClass {
    const API_VERSION: &'static str = "gateway.networking.k8s.io/v1";
    const GROUP: &'static str = "gateway.networking.k8s.io";
    const KIND: &'static str = "GatewayClass";
    const VERSION: &'static str = "v1";
    const URL_PATH_SEGMENT: &'static str = "gatewayclasses";
    type Scope = k8s_openapi::ClusterResourceScope;
}

impl k8s_openapi::Metadata for GatewayClass {
    type Ty = ObjectMeta;

    fn metadata(&self) -> &ObjectMeta {
        &self.metadata
    }

    fn metadata_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_gateway_ignoring_unknown_fields() {
        let json = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "Gateway",
            "metadata": {"name": "waypoint", "namespace": "egress", "uid": "u-1", "generation": 3},
            "spec": {
                "gatewayClassName": "istio-waypoint",
                "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
            },
            "status": {
                "addresses": [{"type": "IPAddress", "value": "10.0.0.7"}],
                "conditions": [{
                    "type": "Programmed", "status": "True", "reason": "Programmed",
                    "message": "", "lastTransitionTime": "2026-11-23T10:00:00Z",
                    "observedGeneration": 3
                }],
                "listeners": []
            }
        });
        let gw: Gateway = serde_json::from_value(json).expect("parses");
        assert_eq!(gw.spec.gateway_class_name, "istio-waypoint");
        assert_eq!(gw.metadata.generation, Some(3));
        let status = gw.status.expect("status");
        assert_eq!(status.addresses[0].value, "10.0.0.7");
        assert_eq!(status.conditions[0].type_, "Programmed");
    }

    #[test]
    fn a_gateway_without_spec_matches_no_class() {
        let gw: Gateway =
            serde_json::from_value(serde_json::json!({"metadata": {"name": "x"}})).expect("parses");
        assert_eq!(gw.spec.gateway_class_name, "");
    }

    #[test]
    fn reads_a_gateway_class_ignoring_unknown_fields() {
        // As the API server returns it right after creation: the CRD defaults the Accepted
        // condition to Unknown/Pending.
        let json = serde_json::json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "istio-waypoint", "uid": "gc-1", "generation": 1},
            "spec": {
                "controllerName": "strait.dev/waypoint-controller",
                "description": "strait waypoints"
            },
            "status": {
                "conditions": [{
                    "type": "Accepted", "status": "Unknown", "reason": "Pending",
                    "message": "Waiting for controller",
                    "lastTransitionTime": "1970-01-01T00:00:00Z"
                }]
            }
        });
        let class: GatewayClass = serde_json::from_value(json).expect("parses");
        assert_eq!(class.spec.controller_name, "strait.dev/waypoint-controller");
        let status = class.status.expect("status");
        assert_eq!(status.conditions[0].status, "Unknown");
        assert_eq!(status.conditions[0].observed_generation, None);
    }
}
