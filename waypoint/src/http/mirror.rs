//! Traffic mirroring: a copy of the request goes to the mirror destination, fire and forget.
//! The copy's authority gets Envoy's `-shadow` suffix; its response is read and dropped. Bodies
//! too large to buffer are copied as they stream ([`super::body::tee`]). A
//! bounded number of mirrors may be in flight; beyond that copies are skipped, never queued,
//! so mirroring can neither delay nor pile up behind the main request.

use std::net::SocketAddr;
use std::sync::Arc;

use http::HeaderValue;
use mesh_config::route::Destination;
use mesh_config::{Service, ServicePort, Snapshot};
use tracing::debug;

use super::body::ProxyBody;
use super::pipeline::{self, MIRROR_TIMEOUT, Outgoing, TryInfo};
use crate::proxy::Proxy;
use crate::upstream::{self, ClusterRequest, HttpVersion};

/// Most mirrored requests in flight at once.
pub const MAX_IN_FLIGHT: usize = 1024;

/// `aliyun.com` → `aliyun.com-shadow`; `aliyun.com:80` → `aliyun.com-shadow:80`.
pub fn shadow_authority(authority: &str) -> String {
    let host = crate::upstream::endpoints::strip_port(authority);
    if host.len() == authority.len() || host.contains(':') {
        return format!("{authority}-shadow");
    }
    format!("{host}-shadow{}", &authority[host.len()..])
}

/// Sends a copy of `out` (with `body`, a replay of the buffered original or a streaming copy)
/// to `dest`, in the background.
#[allow(clippy::too_many_arguments)]
pub fn spawn(
    proxy: &Arc<Proxy>,
    snap: &Arc<Snapshot>,
    service: &Arc<Service>,
    port: &ServicePort,
    dest: &Destination,
    out: &Outgoing,
    body: ProxyBody,
    downstream: HttpVersion,
    original: SocketAddr,
) {
    let Ok(permit) = proxy.mirrors.clone().try_acquire_owned() else {
        debug!(mirror = %dest.host, "too many mirrored requests in flight; copy skipped");
        return;
    };
    let target = if dest.host == service.hostname {
        Some(service.clone())
    } else {
        snap.service_by_host(&dest.host).cloned()
    };
    let Some(target) = target else {
        debug!(mirror = %dest.host, "mirror destination is not a registered service; copy skipped");
        return;
    };
    let Some(sp) = target.port(dest.port.unwrap_or(port.port)).cloned() else {
        debug!(mirror = %dest.host, "mirror destination has no such port; copy skipped");
        return;
    };
    let cluster = upstream::build_cluster(
        snap,
        &proxy.gateway,
        &target,
        &sp,
        dest.subset.as_deref(),
        ClusterRequest {
            original: Some(original),
            request_host: Some(out.authority_str()),
            downstream,
            upgrade: false,
        },
    );
    let mut copy = out.clone();
    match HeaderValue::try_from(shadow_authority(out.authority_str())) {
        Ok(v) => copy.authority = v,
        // `-shadow` keeps a valid authority valid; skip the copy rather than send it unmarked.
        Err(_) => {
            debug!(mirror = %dest.host, "shadow authority is not a valid header value; copy skipped");
            return;
        }
    }
    let proxy = proxy.clone();
    let snap = snap.clone();
    tokio::spawn(async move {
        let _permit = permit;
        let mut info = TryInfo::default();
        let send = pipeline::try_once(&proxy, &snap, &cluster, &copy, body, &mut info);
        match tokio::time::timeout(MIRROR_TIMEOUT, send).await {
            Ok(Ok(resp)) => {
                debug!(mirror = %cluster.name, status = %resp.status(), "mirrored");
                pipeline::drain(resp).await;
            }
            Ok(Err((failure, _))) => {
                debug!(mirror = %cluster.name, error = ?failure, "mirrored request failed")
            }
            Err(_) => debug!(mirror = %cluster.name, "mirrored request timed out"),
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shadow_hosts() {
        for (input, want) in [
            ("aliyun.com", "aliyun.com-shadow"),
            ("aliyun.com:8080", "aliyun.com-shadow:8080"),
            ("[fd00::1]:80", "[fd00::1]:80-shadow"),
        ] {
            assert_eq!(shadow_authority(input), want, "{input}");
        }
    }
}
