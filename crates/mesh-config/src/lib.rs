//! Mesh configuration for the strait data plane (ztunnel + waypoint).
//!
//! Kubernetes / Istio / Gateway API YAML → validated → compiled into an immutable
//! [`Snapshot`] that both binaries read through a [`ConfigStore`] (directory watch, debounced
//! reload, atomic swap, last-good fallback). See the crate README for the API summary, the
//! namespace rules and the ASMEgressTrafficPolicy MAPPING.

pub mod authz;
pub mod capture;
pub mod cli;
pub mod compile;
pub mod duration;
pub mod embedded;
pub mod error;
pub mod hostmap;
pub mod load;
pub mod model;
pub mod policy;
pub mod route;
pub mod secret;
pub mod snapshot;
pub mod store;
pub mod vip;

mod asm;

pub use authz::{AuthzPolicies, Decision, HttpAttrs, RequestAttrs};
pub use capture::CaptureScope;
pub use error::{ConfigError, LoadErrors};
pub use policy::{ClientTls, DestinationPolicy, TlsMode};
pub use route::{HttpRequestInfo, L4Info, RouteAction, ServiceRoutes};
pub use secret::{CredentialError, CredentialWarning, Pem, TlsCredential};
pub use snapshot::{
    AddressMatch, Controller, Identity, NamespacedName, OutboundTrafficPolicy, Protocol, Service,
    ServicePort, Snapshot, Waypoint, WaypointBinding, Workload,
};
pub use store::ConfigStore;

use std::path::Path;

/// Loads and compiles a configuration directory. All errors are returned at once.
pub fn load_dir(dir: &Path) -> Result<Snapshot, LoadErrors> {
    let loaded = load::read_dir(dir);
    compile::compile_loaded(loaded)
}

/// Loads and compiles in-memory YAML sources (`(relative path, text)`).
pub fn load_sources<'a>(
    sources: impl IntoIterator<Item = (&'a str, &'a str)>,
) -> Result<Snapshot, LoadErrors> {
    let loaded = load::read_sources(
        sources
            .into_iter()
            .map(|(name, text)| load::SourceFile { name, text }),
    );
    compile::compile_loaded(loaded)
}
