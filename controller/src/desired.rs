//! Pure decisions: what a waypoint Gateway should own, and what its status should say.
//!
//! Nothing here does I/O; [`crate::reconcile`] applies the results. Every object is named after
//! the Gateway, lives in its namespace, carries the gateway-name and managed-by labels and a
//! controller ownerReference to the Gateway (so Kubernetes' garbage collector removes it when the
//! Gateway goes).

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, HTTPGetAction, PodSecurityContext, PodSpec,
    PodTemplateSpec, Probe, ResourceRequirements, SeccompProfile, SecretVolumeSource,
    SecurityContext, Service, ServiceAccount, ServicePort, ServiceSpec, Volume, VolumeMount,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    Condition, LabelSelector, ObjectMeta, OwnerReference, Time,
};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::gateway::{
    Gateway, GatewayClass, GatewayClassStatus, GatewayStatus, GatewayStatusAddress,
};

/// The Gateway API label that ties a waypoint's objects (and pods) to their Gateway; the mesh
/// config finds waypoint pods by it.
pub use mesh_config::snapshot::GATEWAY_NAME_LABEL;
/// Our own "managed" label, like Istio's `gateway.istio.io/managed`.
pub const MANAGED_BY_LABEL: &str = "strait.dev/managed-by";
/// The value of [`MANAGED_BY_LABEL`].
pub const MANAGED_BY_VALUE: &str = "waypoint-controller";
/// The server-side-apply field manager for every write.
pub const FIELD_MANAGER: &str = "strait-waypoint-controller";
/// Ztunnel must not capture the waypoint's own traffic (it would loop through itself); Istio
/// puts this label on waypoint pods for the same reason.
pub use mesh_config::snapshot::DATAPLANE_MODE_LABEL;
/// Where the CA secret is mounted in the waypoint container.
pub const CA_MOUNT_PATH: &str = "/etc/strait/ca";
/// The Gateway API's default class for Istio waypoints.
pub const DEFAULT_GATEWAY_CLASS: &str = "istio-waypoint";
/// The `spec.controllerName` of the GatewayClass this controller implements (deploy/strait.yaml).
/// Ours, not Istio's `istio.io/mesh-controller`: a class naming Istio's controller is left alone.
pub const CONTROLLER_NAME: &str = "strait.dev/waypoint-controller";

/// HBONE (Istio's 15008).
pub const HBONE_PORT: i32 = mesh_config::snapshot::HBONE_PORT as i32;
/// Prometheus metrics (Istio's 15020).
pub const METRICS_PORT: i32 = 15020;
/// Readiness (Istio's 15021).
pub const STATUS_PORT: i32 = 15021;
/// The waypoint's admin port, bound to localhost inside the pod.
pub const ADMIN_PORT: i32 = 15000;

/// The Istio proxy's uid/gid; non-root, and what existing PodSecurity exemptions expect.
const PROXY_UID: i64 = 1337;
/// Longer than the waypoint's default drain (`--drain-seconds 20`).
const TERMINATION_GRACE_SECONDS: i64 = 30;

/// Deployment-wide settings, from the controller's flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// Gateways of this `gatewayClassName` are ours.
    pub gateway_class: String,
    /// The waypoint container image.
    pub waypoint_image: String,
    /// `imagePullPolicy`; `None` leaves Kubernetes' default.
    pub image_pull_policy: Option<String>,
    /// Secret in the Gateway's namespace with `ca-cert.pem` and `ca-key.pem`.
    pub ca_secret: String,
    /// For the `Hostname` status address, `<name>.<ns>.svc.<cluster_domain>`.
    pub cluster_domain: String,
}

impl Settings {
    /// Defaults for everything but the image.
    pub fn new(waypoint_image: impl Into<String>) -> Self {
        Self {
            gateway_class: DEFAULT_GATEWAY_CLASS.to_owned(),
            waypoint_image: waypoint_image.into(),
            image_pull_policy: None,
            ca_secret: "strait-ca".to_owned(),
            cluster_domain: mesh_config::snapshot::CLUSTER_DOMAIN.to_owned(),
        }
    }
}

/// Why no objects can be derived from a Gateway.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidGateway {
    /// Objects from the API server always have these; only a malformed object lacks them.
    #[error("gateway has no {0}")]
    Missing(&'static str),
    /// The Service would be rejected: Service names are DNS-1035 labels.
    #[error(
        "gateway name {0:?} is not a valid Service name (a DNS-1035 label: at most 63 characters, lowercase letters, digits and '-', starting with a letter)"
    )]
    Name(String),
}

/// The identity fields every derived object needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GatewayRef {
    pub name: String,
    pub namespace: String,
    pub uid: String,
}

impl GatewayRef {
    /// Name, namespace and uid of `gateway`, or why they are unusable.
    pub fn of(gateway: &Gateway) -> Result<Self, InvalidGateway> {
        let meta = &gateway.metadata;
        let name = meta.name.clone().ok_or(InvalidGateway::Missing("name"))?;
        let namespace = meta
            .namespace
            .clone()
            .ok_or(InvalidGateway::Missing("namespace"))?;
        let uid = meta.uid.clone().ok_or(InvalidGateway::Missing("uid"))?;
        if !is_dns1035_label(&name) {
            return Err(InvalidGateway::Name(name));
        }
        Ok(Self {
            name,
            namespace,
            uid,
        })
    }

    /// `namespace/name`, for logs.
    pub fn key(&self) -> String {
        format!("{}/{}", self.namespace, self.name)
    }
}

/// Whether `s` is a DNS-1035 label (what a Service name must be).
fn is_dns1035_label(s: &str) -> bool {
    let bytes = s.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= 63
        && bytes[0].is_ascii_lowercase()
        && bytes[bytes.len() - 1] != b'-'
        && bytes
            .iter()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || *b == b'-')
}

/// Whether `gateway` is one of ours.
pub fn is_ours(gateway: &Gateway, settings: &Settings) -> bool {
    gateway.spec.gateway_class_name == settings.gateway_class
}

/// Whether this controller has written fields of `gateway` (its status) that it still owns —
/// i.e. it managed the Gateway at some point. The API server records every server-side-apply
/// manager in `metadata.managedFields`, so this survives controller restarts; it is how a Gateway
/// whose class changed away from ours is recognised without asking the API server.
pub fn was_managed_by_us(gateway: &Gateway) -> bool {
    gateway
        .metadata
        .managed_fields
        .iter()
        .flatten()
        .any(|entry| {
            entry.manager.as_deref() == Some(FIELD_MANAGER)
                // An entry that owns nothing is what releasing our fields leaves behind, if the
                // API server keeps it at all.
                && entry
                    .fields_v1
                    .as_ref()
                    .is_some_and(|f| f.0.as_object().is_some_and(|o| !o.is_empty()))
        })
}

/// The labels on every object we create (and the selector of our watches).
pub fn object_labels(gateway_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([
        (GATEWAY_NAME_LABEL.to_owned(), gateway_name.to_owned()),
        (MANAGED_BY_LABEL.to_owned(), MANAGED_BY_VALUE.to_owned()),
    ])
}

/// The label selector that finds every object this controller manages.
pub fn managed_selector() -> String {
    format!("{MANAGED_BY_LABEL}={MANAGED_BY_VALUE}")
}

fn selector_labels(gateway_name: &str) -> BTreeMap<String, String> {
    BTreeMap::from([(GATEWAY_NAME_LABEL.to_owned(), gateway_name.to_owned())])
}

fn owner_reference(gw: &GatewayRef) -> OwnerReference {
    use k8s_openapi::Resource as _;
    OwnerReference {
        api_version: Gateway::API_VERSION.to_owned(),
        kind: Gateway::KIND.to_owned(),
        name: gw.name.clone(),
        uid: gw.uid.clone(),
        controller: Some(true),
        // `blockOwnerDeletion` would need `update` on gateways/finalizers; GC works without it.
        block_owner_deletion: None,
    }
}

fn object_meta(gw: &GatewayRef) -> ObjectMeta {
    ObjectMeta {
        name: Some(gw.name.clone()),
        namespace: Some(gw.namespace.clone()),
        labels: Some(object_labels(&gw.name)),
        owner_references: Some(vec![owner_reference(gw)]),
        ..ObjectMeta::default()
    }
}

/// The waypoint's ServiceAccount, Deployment and Service for `gateway`.
pub fn desired(
    gateway: &Gateway,
    settings: &Settings,
) -> Result<(ServiceAccount, Deployment, Service), InvalidGateway> {
    let gw = GatewayRef::of(gateway)?;
    Ok((
        service_account(&gw),
        deployment(&gw, settings),
        service(&gw),
    ))
}

fn service_account(gw: &GatewayRef) -> ServiceAccount {
    ServiceAccount {
        metadata: object_meta(gw),
        ..ServiceAccount::default()
    }
}

/// The waypoint's command line; flag names are `waypoint/src/main.rs`'s.
pub fn waypoint_args(gw: &GatewayRef) -> Vec<String> {
    [
        "--gateway".to_owned(),
        gw.key(),
        "--config-source".to_owned(),
        "kube".to_owned(),
        "--listen".to_owned(),
        format!("0.0.0.0:{HBONE_PORT}"),
        "--admin".to_owned(),
        format!("127.0.0.1:{ADMIN_PORT}"),
        "--metrics".to_owned(),
        format!("0.0.0.0:{METRICS_PORT}"),
        "--readiness".to_owned(),
        format!("0.0.0.0:{STATUS_PORT}"),
        "--ca-dir".to_owned(),
        CA_MOUNT_PATH.to_owned(),
    ]
    .into()
}

fn container_port(name: &str, port: i32) -> ContainerPort {
    ContainerPort {
        name: Some(name.to_owned()),
        container_port: port,
        protocol: Some("TCP".to_owned()),
        ..ContainerPort::default()
    }
}

fn quantities(pairs: &[(&str, &str)]) -> BTreeMap<String, Quantity> {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), Quantity((*v).to_owned())))
        .collect()
}

fn deployment(gw: &GatewayRef, settings: &Settings) -> Deployment {
    let mut pod_labels = object_labels(&gw.name);
    pod_labels.insert(DATAPLANE_MODE_LABEL.to_owned(), "none".to_owned());
    let annotations = BTreeMap::from([
        ("prometheus.io/scrape".to_owned(), "true".to_owned()),
        ("prometheus.io/port".to_owned(), METRICS_PORT.to_string()),
        (
            "prometheus.io/path".to_owned(),
            "/stats/prometheus".to_owned(),
        ),
    ]);
    let container = Container {
        name: "waypoint".to_owned(),
        image: Some(settings.waypoint_image.clone()),
        image_pull_policy: settings.image_pull_policy.clone(),
        args: Some(waypoint_args(gw)),
        ports: Some(vec![
            container_port("hbone", HBONE_PORT),
            container_port("metrics", METRICS_PORT),
            container_port("status-port", STATUS_PORT),
        ]),
        readiness_probe: Some(Probe {
            http_get: Some(HTTPGetAction {
                path: Some("/healthz/ready".to_owned()),
                port: IntOrString::Int(STATUS_PORT),
                scheme: Some("HTTP".to_owned()),
                ..HTTPGetAction::default()
            }),
            period_seconds: Some(5),
            timeout_seconds: Some(1),
            failure_threshold: Some(4),
            ..Probe::default()
        }),
        // Istio's waypoint defaults.
        resources: Some(ResourceRequirements {
            requests: Some(quantities(&[("cpu", "100m"), ("memory", "128Mi")])),
            limits: Some(quantities(&[("cpu", "2"), ("memory", "1Gi")])),
            ..ResourceRequirements::default()
        }),
        security_context: Some(SecurityContext {
            run_as_non_root: Some(true),
            run_as_user: Some(PROXY_UID),
            run_as_group: Some(PROXY_UID),
            read_only_root_filesystem: Some(true),
            allow_privilege_escalation: Some(false),
            privileged: Some(false),
            capabilities: Some(Capabilities {
                drop: Some(vec!["ALL".to_owned()]),
                add: None,
            }),
            ..SecurityContext::default()
        }),
        volume_mounts: Some(vec![VolumeMount {
            name: "strait-ca".to_owned(),
            mount_path: CA_MOUNT_PATH.to_owned(),
            read_only: Some(true),
            ..VolumeMount::default()
        }]),
        ..Container::default()
    };
    Deployment {
        metadata: object_meta(gw),
        spec: Some(DeploymentSpec {
            // `replicas` is left out on purpose: owning it would fight an HPA or `kubectl scale`;
            // the API server defaults it to 1 on create.
            selector: LabelSelector {
                match_labels: Some(selector_labels(&gw.name)),
                match_expressions: None,
            },
            template: PodTemplateSpec {
                metadata: Some(ObjectMeta {
                    labels: Some(pod_labels),
                    annotations: Some(annotations),
                    ..ObjectMeta::default()
                }),
                spec: Some(PodSpec {
                    service_account_name: Some(gw.name.clone()),
                    containers: vec![container],
                    termination_grace_period_seconds: Some(TERMINATION_GRACE_SECONDS),
                    security_context: Some(PodSecurityContext {
                        seccomp_profile: Some(SeccompProfile {
                            type_: "RuntimeDefault".to_owned(),
                            localhost_profile: None,
                        }),
                        ..PodSecurityContext::default()
                    }),
                    volumes: Some(vec![Volume {
                        name: "strait-ca".to_owned(),
                        secret: Some(SecretVolumeSource {
                            secret_name: Some(settings.ca_secret.clone()),
                            default_mode: Some(0o440),
                            ..SecretVolumeSource::default()
                        }),
                        ..Volume::default()
                    }]),
                    ..PodSpec::default()
                }),
            },
            ..DeploymentSpec::default()
        }),
        status: None,
    }
}

fn service_port(name: &str, port: i32, app_protocol: &str) -> ServicePort {
    ServicePort {
        name: Some(name.to_owned()),
        port,
        target_port: Some(IntOrString::Int(port)),
        protocol: Some("TCP".to_owned()),
        app_protocol: Some(app_protocol.to_owned()),
        ..ServicePort::default()
    }
}

fn service(gw: &GatewayRef) -> Service {
    Service {
        metadata: object_meta(gw),
        spec: Some(ServiceSpec {
            type_: Some("ClusterIP".to_owned()),
            selector: Some(selector_labels(&gw.name)),
            // Istio's waypoint Service: the HBONE port is `mesh`, readiness is `status-port`.
            ports: Some(vec![
                service_port("mesh", HBONE_PORT, "all"),
                service_port("status-port", STATUS_PORT, "tcp"),
            ]),
            ..ServiceSpec::default()
        }),
        status: None,
    }
}

/// The cluster IPs of `service` (dual-stack Services have two), without the `None` of headless
/// Services.
pub fn cluster_ips(service: &Service) -> Vec<String> {
    let Some(spec) = &service.spec else {
        return Vec::new();
    };
    let ips = match (&spec.cluster_ips, &spec.cluster_ip) {
        (Some(ips), _) if !ips.is_empty() => ips.clone(),
        (_, Some(ip)) => vec![ip.clone()],
        _ => Vec::new(),
    };
    ips.into_iter()
        .filter(|ip| !ip.is_empty() && ip != "None")
        .collect()
}

/// Whether at least one waypoint replica is available.
pub fn deployment_available(deployment: &Deployment) -> bool {
    deployment
        .status
        .as_ref()
        .and_then(|s| s.available_replicas)
        .is_some_and(|n| n > 0)
}

/// The Gateway status for the applied `service` and `deployment`: addresses from the Service,
/// `Accepted` and `Programmed` conditions. A condition whose status did not change keeps its
/// `lastTransitionTime` (so an unchanged status compares equal and is not rewritten).
pub fn desired_status(
    gateway: &Gateway,
    settings: &Settings,
    service: &Service,
    deployment: &Deployment,
    now: &Time,
) -> GatewayStatus {
    let ips = cluster_ips(service);
    let mut addresses: Vec<GatewayStatusAddress> = ips
        .iter()
        .map(|ip| GatewayStatusAddress {
            type_: Some("IPAddress".to_owned()),
            value: ip.clone(),
        })
        .collect();
    if let (Some(name), Some(ns)) = (&gateway.metadata.name, &gateway.metadata.namespace) {
        addresses.push(GatewayStatusAddress {
            type_: Some("Hostname".to_owned()),
            value: format!("{name}.{ns}.svc.{}", settings.cluster_domain),
        });
    }

    let (programmed, reason, message) = if ips.is_empty() {
        (
            false,
            "AddressNotAssigned",
            "the waypoint Service has no cluster IP yet".to_owned(),
        )
    } else if !deployment_available(deployment) {
        (
            false,
            "Pending",
            "the waypoint Deployment has no available replica yet".to_owned(),
        )
    } else {
        (true, "Programmed", "waypoint deployed".to_owned())
    };

    let generation = gateway.metadata.generation;
    let previous = gateway
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    let condition = |type_: &str, ok: bool, reason: &str, message: String| {
        make_condition(previous, type_, ok, reason, message, generation, now)
    };
    GatewayStatus {
        addresses,
        conditions: vec![
            condition(
                "Accepted",
                true,
                "Accepted",
                "resources deployed by the strait waypoint controller".to_owned(),
            ),
            condition("Programmed", programmed, reason, message),
        ],
    }
}

/// A condition of `type_`; it keeps the `lastTransitionTime` of the `previous` condition of the
/// same type when its status did not change.
fn make_condition(
    previous: &[Condition],
    type_: &str,
    ok: bool,
    reason: &str,
    message: String,
    generation: Option<i64>,
    now: &Time,
) -> Condition {
    let status = if ok { "True" } else { "False" };
    let last_transition_time = previous
        .iter()
        .find(|c| c.type_ == type_ && c.status == status)
        .map_or_else(|| now.clone(), |c| c.last_transition_time.clone());
    Condition {
        type_: type_.to_owned(),
        status: status.to_owned(),
        reason: reason.to_owned(),
        message,
        observed_generation: generation,
        last_transition_time,
    }
}

/// Whether some condition in `desired` is missing from `current` or differs from it. Conditions
/// of other types (other writers') are not compared.
fn conditions_differ(current: &[Condition], desired: &[Condition]) -> bool {
    desired.iter().any(|want| {
        current
            .iter()
            .find(|c| c.type_ == want.type_)
            .is_none_or(|have| have != want)
    })
}

/// Whether `gateway`'s current status differs from `desired` in anything we own. Conditions of
/// other types (other writers') are not compared.
pub fn status_differs(gateway: &Gateway, desired: &GatewayStatus) -> bool {
    let Some(current) = &gateway.status else {
        return true;
    };
    current.addresses != desired.addresses
        || conditions_differ(&current.conditions, &desired.conditions)
}

/// Whether `class` is the one this controller implements: its name is the configured class
/// **and** its `controllerName` is ours. A class of our name that names another controller (e.g.
/// Istio's `istio.io/mesh-controller`) is not ours to report on; nor is a class of another name
/// that names us — a second strait controller, run with another `--gateway-class`, owns that one,
/// and two controllers writing one class's status would fight.
pub fn is_our_class(class: &GatewayClass, settings: &Settings) -> bool {
    class.metadata.name.as_deref() == Some(settings.gateway_class.as_str())
        && class.spec.controller_name == CONTROLLER_NAME
}

/// The status of our GatewayClass: `Accepted=True`, as istiod reports for its classes. There is
/// nothing to reject: the class has no `parametersRef` we would read.
pub fn desired_class_status(class: &GatewayClass, now: &Time) -> GatewayClassStatus {
    let previous = class
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    GatewayClassStatus {
        conditions: vec![make_condition(
            previous,
            "Accepted",
            true,
            "Accepted",
            "handled by the strait waypoint controller".to_owned(),
            class.metadata.generation,
            now,
        )],
    }
}

/// Whether `class`'s current status differs from `desired` in the conditions we own.
pub fn class_status_differs(class: &GatewayClass, desired: &GatewayClassStatus) -> bool {
    let current = class
        .status
        .as_ref()
        .map(|s| s.conditions.as_slice())
        .unwrap_or_default();
    conditions_differ(current, &desired.conditions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::apps::v1::DeploymentStatus;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use k8s_openapi::jiff::Timestamp;

    fn gateway(name: &str, ns: &str, class: &str) -> Gateway {
        Gateway {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                namespace: Some(ns.to_owned()),
                uid: Some(format!("uid-{name}")),
                generation: Some(2),
                ..ObjectMeta::default()
            },
            spec: crate::gateway::GatewaySpec {
                gateway_class_name: class.to_owned(),
            },
            status: None,
        }
    }

    fn settings() -> Settings {
        Settings::new("registry.example/strait/waypoint:1.0")
    }

    fn time(s: &str) -> Time {
        Time(s.parse::<Timestamp>().expect("timestamp"))
    }

    #[test]
    fn objects_are_named_labelled_and_owned_after_the_gateway() {
        let gw = gateway("egress-wp", "istio-egress", DEFAULT_GATEWAY_CLASS);
        let (sa, deploy, svc) = desired(&gw, &settings()).expect("valid");
        for meta in [&sa.metadata, &deploy.metadata, &svc.metadata] {
            assert_eq!(meta.name.as_deref(), Some("egress-wp"));
            assert_eq!(meta.namespace.as_deref(), Some("istio-egress"));
            let labels = meta.labels.as_ref().expect("labels");
            assert_eq!(labels[GATEWAY_NAME_LABEL], "egress-wp");
            assert_eq!(labels[MANAGED_BY_LABEL], MANAGED_BY_VALUE);
            let owners = meta.owner_references.as_ref().expect("owners");
            assert_eq!(owners.len(), 1);
            assert_eq!(owners[0].api_version, "gateway.networking.k8s.io/v1");
            assert_eq!(owners[0].kind, "Gateway");
            assert_eq!(owners[0].name, "egress-wp");
            assert_eq!(owners[0].uid, "uid-egress-wp");
            assert_eq!(owners[0].controller, Some(true));
        }
    }

    #[test]
    fn deployment_runs_the_waypoint_as_the_gateway_identity() {
        let mut s = settings();
        s.ca_secret = "my-ca".to_owned();
        s.image_pull_policy = Some("IfNotPresent".to_owned());
        let (_, deploy, _) = desired(&gateway("wp", "ns1", "istio-waypoint"), &s).expect("valid");
        let spec = deploy.spec.expect("spec");
        assert_eq!(
            spec.replicas, None,
            "replicas is left to HPA / kubectl scale"
        );
        assert_eq!(
            spec.selector.match_labels,
            Some(selector_labels("wp")),
            "the selector is immutable: only the gateway-name label"
        );
        let template_meta = spec.template.metadata.expect("template metadata");
        let pod_labels = template_meta.labels.expect("pod labels");
        assert_eq!(pod_labels[GATEWAY_NAME_LABEL], "wp");
        assert_eq!(pod_labels[DATAPLANE_MODE_LABEL], "none");
        let annotations = template_meta.annotations.expect("annotations");
        assert_eq!(annotations["prometheus.io/scrape"], "true");
        assert_eq!(annotations["prometheus.io/port"], "15020");
        let pod = spec.template.spec.expect("pod spec");
        assert_eq!(pod.service_account_name.as_deref(), Some("wp"));
        let c = &pod.containers[0];
        assert_eq!(c.image.as_deref(), Some(s.waypoint_image.as_str()));
        assert_eq!(c.image_pull_policy.as_deref(), Some("IfNotPresent"));
        assert_eq!(
            c.args.as_deref().expect("args").join(" "),
            "--gateway ns1/wp --config-source kube --listen 0.0.0.0:15008 \
             --admin 127.0.0.1:15000 --metrics 0.0.0.0:15020 --readiness 0.0.0.0:15021 \
             --ca-dir /etc/strait/ca"
        );
        let ports: Vec<(Option<&str>, i32)> = c
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.container_port))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("hbone"), 15008),
                (Some("metrics"), 15020),
                (Some("status-port"), 15021)
            ]
        );
        let probe = c.readiness_probe.as_ref().expect("probe");
        let get = probe.http_get.as_ref().expect("http get");
        assert_eq!(get.path.as_deref(), Some("/healthz/ready"));
        assert_eq!(get.port, IntOrString::Int(15021));
        let requests = c
            .resources
            .as_ref()
            .and_then(|r| r.requests.as_ref())
            .expect("requests");
        assert_eq!(requests["cpu"], Quantity("100m".to_owned()));
        let sc = c.security_context.as_ref().expect("security context");
        assert_eq!(sc.run_as_non_root, Some(true));
        assert_eq!(sc.read_only_root_filesystem, Some(true));
        assert_eq!(sc.allow_privilege_escalation, Some(false));
        assert_eq!(
            sc.capabilities.as_ref().and_then(|c| c.drop.clone()),
            Some(vec!["ALL".to_owned()])
        );
        let mount = &c.volume_mounts.as_ref().expect("mounts")[0];
        assert_eq!(mount.mount_path, CA_MOUNT_PATH);
        assert_eq!(mount.read_only, Some(true));
        let volume = &pod.volumes.as_ref().expect("volumes")[0];
        assert_eq!(volume.name, mount.name);
        assert_eq!(
            volume
                .secret
                .as_ref()
                .and_then(|s| s.secret_name.as_deref()),
            Some("my-ca")
        );
    }

    #[test]
    fn service_exposes_mesh_and_status_ports_to_the_waypoint_pods() {
        let (_, _, svc) =
            desired(&gateway("wp", "ns1", "istio-waypoint"), &settings()).expect("valid");
        let spec = svc.spec.expect("spec");
        assert_eq!(spec.type_.as_deref(), Some("ClusterIP"));
        assert_eq!(spec.selector, Some(selector_labels("wp")));
        let ports: Vec<(Option<&str>, i32, Option<&str>)> = spec
            .ports
            .iter()
            .flatten()
            .map(|p| (p.name.as_deref(), p.port, p.app_protocol.as_deref()))
            .collect();
        assert_eq!(
            ports,
            [
                (Some("mesh"), 15008, Some("all")),
                (Some("status-port"), 15021, Some("tcp"))
            ]
        );
    }

    #[test]
    fn serialised_objects_carry_api_version_and_kind_for_server_side_apply() {
        let (sa, deploy, svc) =
            desired(&gateway("wp", "ns1", "istio-waypoint"), &settings()).expect("valid");
        for (value, api_version, kind) in [
            (serde_json::to_value(&sa), "v1", "ServiceAccount"),
            (serde_json::to_value(&deploy), "apps/v1", "Deployment"),
            (serde_json::to_value(&svc), "v1", "Service"),
        ] {
            let value = value.expect("serialises");
            assert_eq!(value["apiVersion"], api_version);
            assert_eq!(value["kind"], kind);
            assert!(value.get("status").is_none(), "{kind}: status is not ours");
        }
    }

    #[test]
    fn invalid_gateways_are_rejected() {
        type Mutation = fn(&mut Gateway);
        let cases: &[(&str, Mutation, InvalidGateway)] = &[
            (
                "no uid",
                |g| g.metadata.uid = None,
                InvalidGateway::Missing("uid"),
            ),
            (
                "no namespace",
                |g| g.metadata.namespace = None,
                InvalidGateway::Missing("namespace"),
            ),
            (
                "dotted name",
                |g| g.metadata.name = Some("a.b".to_owned()),
                InvalidGateway::Name("a.b".to_owned()),
            ),
            (
                "leading digit",
                |g| g.metadata.name = Some("1wp".to_owned()),
                InvalidGateway::Name("1wp".to_owned()),
            ),
            (
                "trailing dash",
                |g| g.metadata.name = Some("wp-".to_owned()),
                InvalidGateway::Name("wp-".to_owned()),
            ),
            (
                "64 characters",
                |g| g.metadata.name = Some("a".repeat(64)),
                InvalidGateway::Name("a".repeat(64)),
            ),
        ];
        for (what, mutate, want) in cases {
            let mut gw = gateway("wp", "ns", "istio-waypoint");
            mutate(&mut gw);
            assert_eq!(
                desired(&gw, &settings()).err().as_ref(),
                Some(want),
                "{what}"
            );
        }
        let mut gw = gateway("wp", "ns", "istio-waypoint");
        gw.metadata.name = Some("a".repeat(63));
        assert!(desired(&gw, &settings()).is_ok(), "63 characters is fine");
    }

    #[test]
    fn class_decides_ownership() {
        let s = settings();
        assert!(is_ours(&gateway("a", "b", "istio-waypoint"), &s));
        assert!(!is_ours(&gateway("a", "b", "istio"), &s));
        assert!(!is_ours(&gateway("a", "b", ""), &s));
        let mut custom = s.clone();
        custom.gateway_class = "strait".to_owned();
        assert!(is_ours(&gateway("a", "b", "strait"), &custom));
        assert!(!is_ours(&gateway("a", "b", "istio-waypoint"), &custom));
    }

    #[test]
    fn managed_fields_tell_whether_we_managed_a_gateway() {
        let entry = |manager: &str, fields: serde_json::Value| ManagedFieldsEntry {
            manager: Some(manager.to_owned()),
            operation: Some("Apply".to_owned()),
            subresource: Some("status".to_owned()),
            fields_v1: Some(FieldsV1(fields)),
            ..ManagedFieldsEntry::default()
        };
        let owned = serde_json::json!({"f:status": {"f:addresses": {}}});
        let cases = [
            ("no entries", vec![], false),
            ("ours", vec![entry(FIELD_MANAGER, owned.clone())], true),
            (
                "someone else's",
                vec![entry("kubectl", owned.clone())],
                false,
            ),
            (
                "ours, released",
                vec![entry(FIELD_MANAGER, serde_json::json!({}))],
                false,
            ),
            (
                "ours among others",
                vec![entry("istio", owned.clone()), entry(FIELD_MANAGER, owned)],
                true,
            ),
        ];
        for (what, entries, want) in cases {
            let mut gw = gateway("wp", "ns", "istio");
            gw.metadata.managed_fields = Some(entries);
            assert_eq!(was_managed_by_us(&gw), want, "{what}");
        }
    }

    fn service_with(cluster_ip: Option<&str>, cluster_ips: Option<Vec<&str>>) -> Service {
        Service {
            spec: Some(ServiceSpec {
                cluster_ip: cluster_ip.map(str::to_owned),
                cluster_ips: cluster_ips.map(|v| v.into_iter().map(str::to_owned).collect()),
                ..ServiceSpec::default()
            }),
            ..Service::default()
        }
    }

    fn deployment_with(available: Option<i32>) -> Deployment {
        Deployment {
            status: Some(DeploymentStatus {
                available_replicas: available,
                ..DeploymentStatus::default()
            }),
            ..Deployment::default()
        }
    }

    #[test]
    fn status_reflects_service_address_and_deployment_availability() {
        let now = time("2026-11-23T15:00:00Z");
        let gw = gateway("wp", "ns1", "istio-waypoint");
        // (what, service, available replicas, addresses, Programmed status, reason)
        let cases = [
            (
                "ready",
                service_with(Some("10.96.0.10"), Some(vec!["10.96.0.10"])),
                Some(1),
                vec!["10.96.0.10", "wp.ns1.svc.cluster.local"],
                "True",
                "Programmed",
            ),
            (
                "dual stack",
                service_with(Some("10.96.0.10"), Some(vec!["10.96.0.10", "fd00::a"])),
                Some(2),
                vec!["10.96.0.10", "fd00::a", "wp.ns1.svc.cluster.local"],
                "True",
                "Programmed",
            ),
            (
                "no cluster IP yet",
                service_with(None, None),
                Some(1),
                vec!["wp.ns1.svc.cluster.local"],
                "False",
                "AddressNotAssigned",
            ),
            (
                "headless",
                service_with(Some("None"), None),
                Some(1),
                vec!["wp.ns1.svc.cluster.local"],
                "False",
                "AddressNotAssigned",
            ),
            (
                "deployment not available",
                service_with(Some("10.96.0.10"), None),
                Some(0),
                vec!["10.96.0.10", "wp.ns1.svc.cluster.local"],
                "False",
                "Pending",
            ),
            (
                "deployment without status",
                service_with(Some("10.96.0.10"), None),
                None,
                vec!["10.96.0.10", "wp.ns1.svc.cluster.local"],
                "False",
                "Pending",
            ),
        ];
        for (what, svc, available, addresses, programmed, reason) in cases {
            let status = desired_status(&gw, &settings(), &svc, &deployment_with(available), &now);
            let got: Vec<&str> = status.addresses.iter().map(|a| a.value.as_str()).collect();
            assert_eq!(got, addresses, "{what}");
            assert_eq!(
                status.addresses[0].type_.as_deref(),
                Some(if programmed == "True" || reason == "Pending" {
                    "IPAddress"
                } else {
                    "Hostname"
                }),
                "{what}"
            );
            let accepted = &status.conditions[0];
            assert_eq!(
                (accepted.type_.as_str(), accepted.status.as_str()),
                ("Accepted", "True")
            );
            let p = &status.conditions[1];
            assert_eq!(p.type_, "Programmed", "{what}");
            assert_eq!(p.status, programmed, "{what}");
            assert_eq!(p.reason, reason, "{what}");
            for c in &status.conditions {
                assert_eq!(c.observed_generation, Some(2), "{what}");
                assert_eq!(c.last_transition_time, now, "{what}");
            }
        }
    }

    #[test]
    fn unchanged_status_keeps_transition_times_and_is_not_rewritten() {
        let earlier = time("2026-11-23T10:00:00Z");
        let now = time("2026-11-23T15:00:00Z");
        let mut gw = gateway("wp", "ns1", "istio-waypoint");
        let svc = service_with(Some("10.96.0.10"), None);
        let first = desired_status(&gw, &settings(), &svc, &deployment_with(Some(1)), &earlier);
        assert!(status_differs(&gw, &first), "no status yet");
        gw.status = Some(first.clone());

        let again = desired_status(&gw, &settings(), &svc, &deployment_with(Some(1)), &now);
        assert_eq!(
            again, first,
            "same inputs, same status, old transition times"
        );
        assert!(!status_differs(&gw, &again));

        // The Deployment lost its replicas: Programmed flips and gets a new transition time,
        // Accepted keeps its old one.
        let degraded = desired_status(&gw, &settings(), &svc, &deployment_with(Some(0)), &now);
        assert!(status_differs(&gw, &degraded));
        assert_eq!(degraded.conditions[0].last_transition_time, earlier);
        assert_eq!(degraded.conditions[1].last_transition_time, now);

        // A new generation is a difference even when nothing else changed.
        gw.metadata.generation = Some(3);
        let next = desired_status(&gw, &settings(), &svc, &deployment_with(Some(1)), &now);
        assert!(status_differs(&gw, &next));

        // Another writer's condition does not make ours differ.
        let mut with_other = first.clone();
        with_other.conditions.push(Condition {
            type_: "ResolvedRefs".to_owned(),
            status: "True".to_owned(),
            reason: "ResolvedRefs".to_owned(),
            message: String::new(),
            observed_generation: Some(2),
            last_transition_time: earlier.clone(),
        });
        let mut gw2 = gateway("wp", "ns1", "istio-waypoint");
        gw2.status = Some(with_other);
        assert!(!status_differs(&gw2, &first));
    }

    fn gateway_class(name: &str, controller: &str) -> GatewayClass {
        GatewayClass {
            metadata: ObjectMeta {
                name: Some(name.to_owned()),
                generation: Some(3),
                ..ObjectMeta::default()
            },
            spec: crate::gateway::GatewayClassSpec {
                controller_name: controller.to_owned(),
            },
            status: None,
        }
    }

    #[test]
    fn a_class_is_ours_by_name_and_controller_name() {
        let s = settings();
        let cases = [
            ("ours", "istio-waypoint", CONTROLLER_NAME, true),
            (
                "istio's",
                "istio-waypoint",
                "istio.io/mesh-controller",
                false,
            ),
            ("no controller", "istio-waypoint", "", false),
            ("another name", "strait-b", CONTROLLER_NAME, false),
        ];
        for (what, name, controller, want) in cases {
            assert_eq!(
                is_our_class(&gateway_class(name, controller), &s),
                want,
                "{what}"
            );
        }
        let mut nameless = gateway_class("istio-waypoint", CONTROLLER_NAME);
        nameless.metadata.name = None;
        assert!(!is_our_class(&nameless, &s));
        let mut custom = s.clone();
        custom.gateway_class = "strait-b".to_owned();
        assert!(is_our_class(
            &gateway_class("strait-b", CONTROLLER_NAME),
            &custom
        ));
    }

    #[test]
    fn class_status_is_accepted_and_rewritten_only_on_change() {
        let epoch = time("1970-01-01T00:00:00Z");
        let earlier = time("2026-11-23T10:00:00Z");
        let now = time("2026-11-23T15:00:00Z");
        let mut class = gateway_class("istio-waypoint", CONTROLLER_NAME);
        // What the CRD defaults a new class's status to.
        class.status = Some(GatewayClassStatus {
            conditions: vec![Condition {
                type_: "Accepted".to_owned(),
                status: "Unknown".to_owned(),
                reason: "Pending".to_owned(),
                message: "Waiting for controller".to_owned(),
                observed_generation: None,
                last_transition_time: epoch,
            }],
        });
        let first = desired_class_status(&class, &earlier);
        assert_eq!(
            first.conditions,
            [Condition {
                type_: "Accepted".to_owned(),
                status: "True".to_owned(),
                reason: "Accepted".to_owned(),
                message: "handled by the strait waypoint controller".to_owned(),
                observed_generation: Some(3),
                last_transition_time: earlier.clone(),
            }]
        );
        assert!(class_status_differs(&class, &first), "Unknown → True");

        class.status = Some(first.clone());
        let again = desired_class_status(&class, &now);
        assert_eq!(again, first, "unchanged: the old transition time is kept");
        assert!(!class_status_differs(&class, &again));

        // Another writer's condition is not ours to compare.
        let mut with_other = first.clone();
        with_other.conditions.insert(
            0,
            Condition {
                type_: "SupportedVersion".to_owned(),
                status: "True".to_owned(),
                reason: "SupportedVersion".to_owned(),
                message: String::new(),
                observed_generation: Some(3),
                last_transition_time: earlier.clone(),
            },
        );
        class.status = Some(with_other);
        assert!(!class_status_differs(&class, &again));

        // A new generation (e.g. an edited description) must be observed.
        class.metadata.generation = Some(4);
        let next = desired_class_status(&class, &now);
        assert!(class_status_differs(&class, &next));
        assert_eq!(next.conditions[0].observed_generation, Some(4));
        assert_eq!(next.conditions[0].last_transition_time, earlier);

        class.status = None;
        assert!(class_status_differs(&class, &next), "no status at all");
    }
}
