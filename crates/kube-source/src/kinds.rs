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
    /// Every object of one namespace chosen at run time
    /// ([`KubeSourceOptions::secret_namespace`](crate::KubeSourceOptions::secret_namespace));
    /// not watched at all without one. Secrets: a waypoint reads `credentialName` Secrets
    /// from its own namespace, as Istio's gateways do, so its RBAC grant is one Role there.
    OwnNamespace,
}

/// One watched resource.
#[derive(Debug, PartialEq, Eq)]
pub struct KindSpec {
    /// `kind` as mesh-config's loader expects it.
    pub kind: &'static str,
    /// API group, empty for the core group.
    pub group: &'static str,
    /// Versions we read, preferred first; never empty. With more than one, the first the API
    /// server serves is discovered before watching (older control planes serve only older
    /// versions; the fields we read are the same in all of them).
    pub versions: &'static [&'static str],
    pub plural: &'static str,
    pub scope: Scope,
}

impl KindSpec {
    /// The preferred version (what a current control plane serves).
    pub fn preferred_version(&self) -> &'static str {
        self.versions.first().copied().unwrap_or("v1")
    }

    /// Whether the served version has to be discovered (more than one candidate).
    pub fn discovers_version(&self) -> bool {
        self.versions.len() > 1
    }

    /// `v1` or `<group>/<version>`.
    pub fn api_version(&self, version: &str) -> String {
        if self.group.is_empty() {
            version.to_owned()
        } else {
            format!("{}/{version}", self.group)
        }
    }

    pub fn api_resource(&self, version: &str) -> ApiResource {
        ApiResource {
            group: self.group.to_owned(),
            version: version.to_owned(),
            api_version: self.api_version(version),
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
    versions: &'static [&'static str],
    plural: &'static str,
) -> KindSpec {
    KindSpec {
        kind,
        group,
        versions,
        plural,
        scope: Scope::AllNamespaces,
    }
}

/// Index of the Namespace kind in [`KINDS`] (their labels enrol pods in the mesh).
pub const NAMESPACE: usize = 0;
/// Index of the Pod kind in [`KINDS`] (netns discovery annotates these objects).
pub const POD: usize = 2;
/// Index of the DestinationRule kind in [`KINDS`] (their `credentialName`s pick the Secrets).
pub const DESTINATION_RULE: usize = 5;
/// Index of the Secret kind in [`KINDS`].
pub const SECRET: usize = 11;

const V1: &[&str] = &["v1"];
/// `v1` since Istio 1.22; older control planes serve `v1beta1` and `v1alpha3` only.
const ISTIO_NETWORKING: &[&str] = &["v1", "v1beta1", "v1alpha3"];
/// `v1` since Istio 1.22; `v1beta1` before.
const ISTIO_SECURITY: &[&str] = &["v1", "v1beta1"];
/// Gateway and HTTPRoute are `v1` since Gateway API 1.0; `v1beta1` before.
const GATEWAY_API: &[&str] = &["v1", "v1beta1"];

/// Everything mesh-config compiles. Istio's resources preferably at `v1` (Istio ≥ 1.22), else
/// at the older version the control plane serves; Gateway API likewise; ASMEgressTrafficPolicy
/// at the `istio.alibabacloud.com/v1beta1` the ASM guides use. mesh-config's loader accepts
/// every version listed here.
pub const KINDS: &[KindSpec] = &[
    KindSpec {
        kind: "Namespace",
        group: "",
        versions: V1,
        plural: "namespaces",
        scope: Scope::Cluster,
    },
    all("Service", "", V1, "services"),
    all("Pod", "", V1, "pods"),
    KindSpec {
        kind: "ConfigMap",
        group: "",
        versions: V1,
        plural: "configmaps",
        scope: Scope::Single {
            namespace: mesh_config::snapshot::ROOT_NAMESPACE,
            name: "istio",
        },
    },
    all(
        "ServiceEntry",
        "networking.istio.io",
        ISTIO_NETWORKING,
        "serviceentries",
    ),
    all(
        "DestinationRule",
        "networking.istio.io",
        ISTIO_NETWORKING,
        "destinationrules",
    ),
    all(
        "VirtualService",
        "networking.istio.io",
        ISTIO_NETWORKING,
        "virtualservices",
    ),
    all(
        "AuthorizationPolicy",
        "security.istio.io",
        ISTIO_SECURITY,
        "authorizationpolicies",
    ),
    all(
        "Gateway",
        "gateway.networking.k8s.io",
        GATEWAY_API,
        "gateways",
    ),
    all(
        "HTTPRoute",
        "gateway.networking.k8s.io",
        GATEWAY_API,
        "httproutes",
    ),
    all(
        "ASMEgressTrafficPolicy",
        "istio.alibabacloud.com",
        &["v1beta1"],
        "asmegresstrafficpolicies",
    ),
    KindSpec {
        kind: "Secret",
        group: "",
        versions: V1,
        plural: "secrets",
        scope: Scope::OwnNamespace,
    },
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_is_accepted_by_the_loader() {
        // A kind/apiVersion the loader skipped or rejected would silently drop config: every
        // version we may discover must be read as that kind.
        for (k, version) in KINDS
            .iter()
            .flat_map(|k| k.versions.iter().map(move |v| (k, *v)))
        {
            let name = "x";
            let ns = if k.scope == Scope::Cluster {
                String::new()
            } else {
                "namespace: istio-system, ".into()
            };
            let yaml = format!(
                "{{apiVersion: {}, kind: {}, metadata: {{{ns}name: {name}}}}}",
                k.api_version(version),
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
                + r.egress_policies.len()
                + r.secrets.len();
            // Objects without a spec may fail validation; what matters is that the loader
            // read them as this kind (no skip, no apiVersion error).
            let typed = objects == 1
                || (!loaded.errors.is_empty()
                    && loaded.errors.iter().all(|e| {
                        e.kind.as_deref() == Some(k.kind) && !e.message.contains("apiVersion")
                    }));
            assert!(
                typed,
                "{} {}: {:?}",
                k.api_version(version),
                k.kind,
                loaded.errors
            );
        }
        assert_eq!(KINDS[POD].kind, "Pod");
        assert_eq!(KINDS[SECRET].kind, "Secret");
        assert_eq!(KINDS[DESTINATION_RULE].kind, "DestinationRule");
        assert!(KINDS.iter().all(|k| !k.versions.is_empty()));
    }

    #[test]
    fn names() {
        assert_eq!(KINDS[0].api_version("v1"), "v1");
        assert_eq!(KINDS[NAMESPACE].kind, "Namespace");
        assert_eq!(KINDS[POD].kind, "Pod");
        assert_eq!(
            KINDS[4].api_version(KINDS[4].preferred_version()),
            "networking.istio.io/v1"
        );
        assert_eq!(
            KINDS[7].api_resource("v1beta1").api_version,
            "security.istio.io/v1beta1"
        );
        // Istio's kinds fall back to older versions; core kinds never need discovery.
        let discovered: Vec<&str> = KINDS
            .iter()
            .filter(|k| k.discovers_version())
            .map(|k| k.kind)
            .collect();
        assert_eq!(
            discovered,
            [
                "ServiceEntry",
                "DestinationRule",
                "VirtualService",
                "AuthorizationPolicy",
                "Gateway",
                "HTTPRoute"
            ]
        );
        assert_eq!(
            KINDS[10].resource_name(),
            "asmegresstrafficpolicies.istio.alibabacloud.com"
        );
    }
}
