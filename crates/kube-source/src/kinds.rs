//! The resources watched, with the exact group / version / plural served by the API server.
//!
//! Every kind is watched as a [`DynamicObject`](kube::api::DynamicObject): the objects are
//! handed to mesh-config's loader as JSON, which does all typing and validation, so there is
//! one code path (and one set of error messages) for directory and cluster configuration.
use kube::discovery::ApiResource;

/// Where a kind is listed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// Cluster-scoped (`/api/v1/namespaces`).
    Cluster,
    /// Every namespace (`/apis/<group>/<version>/<plural>`).
    AllNamespaces,
    /// One object in one namespace (list filtered by `metadata.name`): only mesh-config's
    /// `istio-system/istio` ConfigMap is read, so the RBAC grant stays that narrow.
    Single {
        namespace: &'static str,
        name: &'static str,
    },
}

/// One watched resource.
#[derive(Debug, PartialEq, Eq)]
pub struct KindSpec {
    /// `kind` as mesh-config's loader expects it.
    pub kind: &'static str,
    /// API group, empty for the core group.
    pub group: &'static str,
    pub version: &'static str,
    pub plural: &'static str,
    pub scope: Scope,
}

impl KindSpec {
    /// `v1` or `<group>/<version>`.
    pub fn api_version(&self) -> String {
        if self.group.is_empty() {
            self.version.to_owned()
        } else {
            format!("{}/{}", self.group, self.version)
        }
    }

    pub fn api_resource(&self) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: self.version.to_owned(),
            api_version: self.api_version(),
            kind: self.kind.to_owned(),
            plural: self.plural.to_owned(),
        }
    }

    /// `plural.group` (`pods`, `serviceentries.networking.istio.io`): the name RBAC rules and
    /// CRDs use, printed in logs.
    pub fn resource_name(&self) -> String {
        if self.group.is_empty() {
            self.plural.to_owned()
        } else {
            format!("{}.{}", self.plural, self.group)
        }
    }
}

const fn all(
    kind: &'static str,
    group: &'static str,
    version: &'static str,
    plural: &'static str,
) -> KindSpec {
    KindSpec {
        kind,
        group,
        version,
        plural,
        scope: Scope::AllNamespaces,
    }
}

/// Index of the Pod kind in [`KINDS`] (netns discovery annotates these objects).
pub const POD: usize = 2;

/// Everything mesh-config compiles. Istio's resources at `v1`, the version Istio ≥ 1.22
/// serves (and stores); Gateway API at `v1`; ASMEgressTrafficPolicy at the
/// `istio.alibabacloud.com/v1beta1` the ASM guides use.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: "Namespace",
        group: "",
        version: "v1",
        plural: "namespaces",
        scope: Scope::Cluster,
    },
    all("Service", "", "v1", "services"),
    all("Pod", "", "v1", "pods"),
    KindSpec {
        kind: "ConfigMap",
        group: "",
        version: "v1",
        plural: "configmaps",
        scope: Scope::Single {
            namespace: mesh_config::snapshot::ROOT_NAMESPACE,
            name: "istio",
        },
    },
    all(
        "ServiceEntry",
        "networking.istio.io",
        "v1",
        "serviceentries",
    ),
    all(
        "DestinationRule",
        "networking.istio.io",
        "v1",
        "destinationrules",
    ),
    all(
        "VirtualService",
        "networking.istio.io",
        "v1",
        "virtualservices",
    ),
    all(
        "AuthorizationPolicy",
        "security.istio.io",
        "v1",
        "authorizationpolicies",
    ),
    all("Gateway", "gateway.networking.k8s.io", "v1", "gateways"),
    all("HTTPRoute", "gateway.networking.k8s.io", "v1", "httproutes"),
    all(
        "ASMEgressTrafficPolicy",
        "istio.alibabacloud.com",
        "v1beta1",
        "asmegresstrafficpolicies",
    ),
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_accepted_by_the_loader() {
        // A kind/apiVersion the loader skipped or rejected would silently drop config.
        for k in KINDS {
            let name = "x";
            let ns = if k.scope == Scope::Cluster {
                String::new()
            } else {
                "namespace: istio-system, ".into()
            };
            let yaml = format!(
                "{{apiVersion: {}, kind: {}, metadata: {{{ns}name: {name}}}}}",
                k.api_version(),
                k.kind
            );
            let loaded = mesh_config::load::read_sources([mesh_config::load::SourceFile {
                name: "t.yaml",
                text: &yaml,
            }]);
            let r = &loaded.resources;
            let objects = r.namespaces.len()
                + r.services.len()
                + r.pods.len()
                + r.config_maps.len()
                + r.service_entries.len()
                + r.destination_rules.len()
                + r.virtual_services.len()
                + r.authorization_policies.len()
                + r.gateways.len()
                + r.http_routes.len()
                + r.egress_policies.len();
            // Objects without a spec may fail validation; what matters is that the loader
            // read them as this kind (no skip, no apiVersion error).
            let typed = objects == 1
                || (!loaded.errors.is_empty()
                    && loaded.errors.iter().all(|e| {
                        e.kind.as_deref() == Some(k.kind) && !e.message.contains("apiVersion")
                    }));
            assert!(typed, "{} {}: {:?}", k.api_version(), k.kind, loaded.errors);
        }
        assert_eq!(KINDS[POD].kind, "Pod");
    }

    #[test]
    fn names() {
        assert_eq!(KINDS[0].api_version(), "v1");
        assert_eq!(KINDS[4].api_version(), "networking.istio.io/v1");
        assert_eq!(
            KINDS[10].resource_name(),
            "asmegresstrafficpolicies.istio.alibabacloud.com"
        );
    }
}
