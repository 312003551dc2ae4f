//! The `kube::runtime::Controller` wiring of [`waypoint_controller::run`], against a scripted API
//! server: the watches it opens (Gateways, our objects by label, our GatewayClass by name),
//! readiness once the Gateway cache synced, applies for a Gateway of our class only, the
//! GatewayClass accepted, and shutdown.

use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode};
use http_body::Frame;
use http_body_util::combinators::UnsyncBoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use kube::client::Body;
use serde_json::{Value, json};
use waypoint_controller::{ControllerMetrics, Outcome, Settings};

type ResponseBody = UnsyncBoxBody<Bytes, Infallible>;

const MANAGED_SELECTOR: &str = "labelSelector=strait.dev%2Fmanaged-by%3Dwaypoint-controller";
const CLASS_SELECTOR: &str = "fieldSelector=metadata.name%3Distio-waypoint";
const CLASS_STATUS: &str =
    "/apis/gateway.networking.k8s.io/v1/gatewayclasses/istio-waypoint/status";

fn json_body(value: &Value) -> ResponseBody {
    Full::new(Bytes::from(serde_json::to_vec(value).expect("json"))).boxed_unsync()
}

/// A watch that stays open and silent.
fn open_watch() -> ResponseBody {
    StreamBody::new(futures::stream::pending::<Result<Frame<Bytes>, Infallible>>()).boxed_unsync()
}

fn gateway(name: &str, class: &str) -> Value {
    json!({
        "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
        "metadata": {"name": name, "namespace": "egress", "uid": format!("uid-{name}"),
                     "generation": 1, "resourceVersion": "10"},
        "spec": {"gatewayClassName": class}
    })
}

fn list(kind: &str, items: Vec<Value>) -> Value {
    json!({"kind": format!("{kind}List"), "apiVersion": "v1",
           "metadata": {"resourceVersion": "10"}, "items": items})
}

#[tokio::test]
async fn the_controller_watches_and_applies_for_our_gateways_only() {
    let (service, mut handle) = tower_test::mock::pair::<Request<Body>, Response<ResponseBody>>();
    let client = kube::Client::new(service, "default");
    let registry = prometheus::Registry::new();
    let metrics = ControllerMetrics::new(&registry).expect("metrics");
    let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let controller = tokio::spawn(waypoint_controller::run(
        client,
        Settings::new("waypoint:test"),
        metrics.clone(),
        move || {
            let _ = ready_tx.send(());
        },
        async move {
            let _ = stop_rx.await;
        },
    ));

    let seen: Arc<Mutex<Vec<(Method, String)>>> = Arc::default();
    let server = {
        let seen = seen.clone();
        async move {
            let mut lists = Vec::new();
            let (mut gateway_status, mut class_status) = (None, None);
            loop {
                let (request, send) = handle.next_request().await.expect("a request");
                let method = request.method().clone();
                let path = request.uri().path().to_owned();
                let query = request.uri().query().unwrap_or_default().to_owned();
                seen.lock()
                    .expect("lock")
                    .push((method.clone(), format!("{path}?{query}")));
                let reply = |status: StatusCode, body: ResponseBody| {
                    Response::builder()
                        .status(status)
                        .body(body)
                        .expect("response")
                };
                if method == Method::GET && query.contains("watch=true") {
                    send.send_response(reply(StatusCode::OK, open_watch()));
                    continue;
                }
                if method == Method::GET {
                    lists.push((path.clone(), query.clone()));
                    let body = match path.as_str() {
                        "/apis/gateway.networking.k8s.io/v1/gateways" => list(
                            "Gateway",
                            vec![gateway("wp", "istio-waypoint"), gateway("other", "istio")],
                        ),
                        "/apis/apps/v1/deployments" => list("Deployment", vec![]),
                        "/api/v1/services" => list("Service", vec![]),
                        "/api/v1/serviceaccounts" => list("ServiceAccount", vec![]),
                        // What the field selector leaves of the classes.
                        "/apis/gateway.networking.k8s.io/v1/gatewayclasses" => list(
                            "GatewayClass",
                            vec![json!({
                                "apiVersion": "gateway.networking.k8s.io/v1",
                                "kind": "GatewayClass",
                                "metadata": {"name": "istio-waypoint", "uid": "uid-class",
                                             "generation": 1, "resourceVersion": "10"},
                                "spec": {"controllerName": "strait.dev/waypoint-controller"}
                            })],
                        ),
                        other => panic!("unexpected GET {other}"),
                    };
                    send.send_response(reply(StatusCode::OK, json_body(&body)));
                    continue;
                }
                assert_eq!(method, Method::PATCH, "{path}");
                let bytes = request.into_body().collect_bytes().await.expect("body");
                let mut object: Value = serde_json::from_slice(&bytes).expect("json body");
                if path.ends_with("/services/wp") {
                    object["spec"]["clusterIP"] = json!("10.96.0.5");
                }
                if path.ends_with("/deployments/wp") {
                    object["status"] = json!({"availableReplicas": 1});
                }
                send.send_response(reply(StatusCode::OK, json_body(&object)));
                // The two controllers run concurrently: either status may come first.
                if path.ends_with("/gateways/wp/status") {
                    gateway_status = Some(object);
                } else if path == CLASS_STATUS {
                    class_status = Some(object);
                }
                if let (Some(_), Some(_)) = (&gateway_status, &class_status) {
                    return (lists, gateway_status, class_status);
                }
            }
        }
    };
    let (lists, status, class_status) = tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the controller applied and wrote both statuses");
    let (status, class_status) = (
        status.expect("gateway status"),
        class_status.expect("class status"),
    );
    tokio::time::timeout(Duration::from_secs(5), ready_rx)
        .await
        .unwrap_or_else(|_| {
            panic!(
                "readiness reported; requests: {:?}",
                seen.lock().expect("lock")
            )
        })
        .expect("readiness sender kept");

    // One watch per kind; our objects are watched by label only.
    for kind in ["deployments", "services", "serviceaccounts"] {
        let (_, query) = lists
            .iter()
            .find(|(path, _)| path.ends_with(&format!("/{kind}")))
            .unwrap_or_else(|| panic!("{kind} listed"));
        assert!(query.contains(MANAGED_SELECTOR), "{kind}: {query}");
    }
    let (_, gateway_query) = lists
        .iter()
        .find(|(path, _)| path.ends_with("/gateways"))
        .expect("gateways listed");
    assert!(
        !gateway_query.contains("labelSelector"),
        "every Gateway is watched"
    );
    let (_, class_query) = lists
        .iter()
        .find(|(path, _)| path.ends_with("/gatewayclasses"))
        .expect("gateway classes listed");
    assert!(
        class_query.contains(CLASS_SELECTOR),
        "only our class: {class_query}"
    );
    let accepted = &class_status["status"]["conditions"][0];
    assert_eq!(
        (&accepted["type"], &accepted["status"], &accepted["reason"]),
        (&json!("Accepted"), &json!("True"), &json!("Accepted"))
    );
    assert_eq!(accepted["observedGeneration"], 1);

    assert_eq!(status["status"]["addresses"][0]["value"], "10.96.0.5");
    let writes: Vec<String> = seen
        .lock()
        .expect("lock")
        .iter()
        .filter(|(m, _)| *m == Method::PATCH)
        .map(|(_, p)| p.split('?').next().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        writes.iter().filter(|w| *w == CLASS_STATUS).count(),
        1,
        "the class status is written once"
    );
    let writes: Vec<&String> = writes.iter().filter(|w| *w != CLASS_STATUS).collect();
    assert_eq!(
        writes,
        [
            "/api/v1/namespaces/egress/serviceaccounts/wp",
            "/apis/apps/v1/namespaces/egress/deployments/wp",
            "/api/v1/namespaces/egress/services/wp",
            "/apis/gateway.networking.k8s.io/v1/namespaces/egress/gateways/wp/status",
        ],
        "nothing for the Gateway of another class"
    );
    assert_eq!(
        metrics.count(Outcome::Ignored),
        1,
        "the other Gateway was seen"
    );

    stop_tx.send(()).expect("controller still running");
    tokio::time::timeout(Duration::from_secs(10), controller)
        .await
        .expect("the controller stopped on shutdown")
        .expect("controller task");
}
