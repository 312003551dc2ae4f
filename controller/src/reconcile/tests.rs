//! The reconciler against a scripted API server (`tower_test::mock`): the exact requests it
//! makes, and what it does with the answers.

use std::time::Duration;

use http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use prometheus::Registry;
use serde_json::{Value, json};

use super::*;
use crate::gateway::GatewayClassStatus;

type Handle = tower_test::mock::Handle<Request<Body>, Response<Body>>;

const IMAGE: &str = "registry.example/strait/waypoint:1.2.3";
/// Server-side apply, forced, as our field manager — verbatim as kube 5 writes it (an empty
/// first parameter, which the API server ignores).
const SSA_QUERY: &str = "&force=true&fieldManager=strait-waypoint-controller";
/// Generous: only hit when the reconciler makes a request the script does not answer.
const TEST_TIMEOUT: Duration = Duration::from_secs(10);

fn context() -> (Arc<Context>, Handle) {
    let (service, handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
    let client = Client::new(service, "default");
    let metrics = ControllerMetrics::new(&Registry::new()).expect("metrics register");
    let ctx = Context::new(client, Settings::new(IMAGE), metrics);
    (Arc::new(ctx), handle)
}

fn gateway(class: &str) -> Gateway {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "Gateway",
        "metadata": {
            "name": "egress-wp", "namespace": "istio-egress", "uid": "gw-uid-1",
            "generation": 4, "resourceVersion": "100"
        },
        "spec": {
            "gatewayClassName": class,
            "listeners": [{"name": "mesh", "port": 15008, "protocol": "HBONE"}]
        }
    }))
    .expect("gateway parses")
}

/// One request the reconciler made: method, path with query, JSON body (if any).
struct Seen {
    method: Method,
    path: String,
    query: String,
    body: Value,
}

/// Takes the next request off the mock and answers it with `status` and `reply(body)`.
async fn answer(
    handle: &mut Handle,
    status: StatusCode,
    reply: impl FnOnce(&Value) -> Value,
) -> Seen {
    let (request, send) = handle
        .next_request()
        .await
        .expect("the reconciler made another request");
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let query = request.uri().query().unwrap_or_default().to_owned();
    let bytes = request
        .into_body()
        .collect_bytes()
        .await
        .expect("request body");
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).expect("request body is JSON")
    };
    let response = reply(&body);
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&response).expect("json")))
            .expect("response"),
    );
    Seen {
        method,
        path,
        query,
        body,
    }
}

fn not_found(kind: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": format!("{kind} \"egress-wp\" not found"), "reason": "NotFound", "code": 404})
}

fn assert_apply(seen: &Seen, path: &str) {
    assert_eq!(seen.method, Method::PATCH, "{path}");
    assert_eq!(seen.path, path);
    assert_eq!(seen.query, SSA_QUERY, "{path}");
}

fn assert_ours(body: &Value) {
    let meta = &body["metadata"];
    assert_eq!(meta["name"], "egress-wp");
    assert_eq!(meta["namespace"], "istio-egress");
    assert_eq!(
        meta["labels"]["gateway.networking.k8s.io/gateway-name"],
        "egress-wp"
    );
    assert_eq!(
        meta["labels"]["strait.dev/managed-by"],
        "waypoint-controller"
    );
    assert_eq!(
        meta["ownerReferences"],
        json!([{
            "apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
            "name": "egress-wp", "uid": "gw-uid-1", "controller": true
        }])
    );
}

/// The API server's answer to an apply: the object, plus what the server fills in.
fn applied(body: &Value, extra: impl FnOnce(&mut Value)) -> Value {
    let mut object = body.clone();
    object["metadata"]["uid"] = json!("child-uid");
    object["metadata"]["resourceVersion"] = json!("7");
    extra(&mut object);
    object
}

/// Serves the three applies; the Service gets `cluster_ip`, the Deployment `available` replicas.
async fn serve_applies(handle: &mut Handle, cluster_ip: Option<&str>, available: i32) -> [Seen; 3] {
    let sa = answer(handle, StatusCode::OK, |b| applied(b, |_| {})).await;
    let deploy = answer(handle, StatusCode::OK, |b| {
        applied(b, |o| {
            o["status"] = json!({"replicas": 1, "availableReplicas": available});
        })
    })
    .await;
    let svc = answer(handle, StatusCode::OK, |b| {
        applied(b, |o| {
            if let Some(ip) = cluster_ip {
                o["spec"]["clusterIP"] = json!(ip);
                o["spec"]["clusterIPs"] = json!([ip]);
            }
        })
    })
    .await;
    [sa, deploy, svc]
}

#[tokio::test]
async fn applies_objects_and_reports_the_service_address() {
    let (ctx, mut handle) = context();
    let gw = Arc::new(gateway("istio-waypoint"));
    let server = async {
        let [sa, deploy, svc] = serve_applies(&mut handle, Some("10.96.12.34"), 1).await;
        let status = answer(&mut handle, StatusCode::OK, |b| b.clone()).await;
        (sa, deploy, svc, status)
    };
    let (result, (sa, deploy, svc, status)) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(reconcile(gw, ctx.clone()), server)
    })
    .await
    .expect("reconcile finished");
    assert_eq!(result.expect("reconciled"), Action::requeue(RESYNC));

    assert_apply(
        &sa,
        "/api/v1/namespaces/istio-egress/serviceaccounts/egress-wp",
    );
    assert_eq!(sa.body["kind"], "ServiceAccount");
    assert_ours(&sa.body);

    assert_apply(
        &deploy,
        "/apis/apps/v1/namespaces/istio-egress/deployments/egress-wp",
    );
    assert_eq!(deploy.body["kind"], "Deployment");
    assert_eq!(deploy.body["apiVersion"], "apps/v1");
    assert_ours(&deploy.body);
    let pod = &deploy.body["spec"]["template"]["spec"];
    assert_eq!(pod["serviceAccountName"], "egress-wp");
    let container = &pod["containers"][0];
    assert_eq!(container["image"], IMAGE);
    assert_eq!(
        container["args"],
        json!([
            "--gateway",
            "istio-egress/egress-wp",
            "--config-source",
            "kube",
            "--listen",
            "0.0.0.0:15008",
            "--admin",
            "127.0.0.1:15000",
            "--metrics",
            "0.0.0.0:15020",
            "--readiness",
            "0.0.0.0:15021",
            "--ca-dir",
            "/etc/strait/ca"
        ])
    );
    let ports: Vec<&Value> = container["ports"]
        .as_array()
        .expect("ports")
        .iter()
        .map(|p| &p["containerPort"])
        .collect();
    assert_eq!(ports, [&json!(15008), &json!(15020), &json!(15021)]);
    assert_eq!(pod["volumes"][0]["secret"]["secretName"], "strait-ca");
    assert!(deploy.body["spec"].get("replicas").is_none());

    assert_apply(&svc, "/api/v1/namespaces/istio-egress/services/egress-wp");
    assert_ours(&svc.body);
    assert_eq!(
        svc.body["spec"]["selector"],
        json!({"gateway.networking.k8s.io/gateway-name": "egress-wp"})
    );
    assert_eq!(svc.body["spec"]["ports"][0]["name"], "mesh");
    assert_eq!(svc.body["spec"]["ports"][0]["port"], 15008);

    assert_apply(
        &status,
        "/apis/gateway.networking.k8s.io/v1/namespaces/istio-egress/gateways/egress-wp/status",
    );
    assert_eq!(status.body["kind"], "Gateway");
    assert_eq!(
        status.body["status"]["addresses"],
        json!([
            {"type": "IPAddress", "value": "10.96.12.34"},
            {"type": "Hostname", "value": "egress-wp.istio-egress.svc.cluster.local"}
        ])
    );
    let conditions = status.body["status"]["conditions"]
        .as_array()
        .expect("conditions");
    let summary: Vec<(&Value, &Value, &Value)> = conditions
        .iter()
        .map(|c| (&c["type"], &c["status"], &c["observedGeneration"]))
        .collect();
    assert_eq!(
        summary,
        [
            (&json!("Accepted"), &json!("True"), &json!(4)),
            (&json!("Programmed"), &json!("True"), &json!(4))
        ]
    );
    assert!(status.body.get("spec").is_none(), "only status is written");

    assert_eq!(ctx.metrics().count(Outcome::Programmed), 1);
}

#[tokio::test]
async fn programmed_false_until_the_service_has_an_address() {
    let (ctx, mut handle) = context();
    let gw = Arc::new(gateway("istio-waypoint"));
    let server = async {
        serve_applies(&mut handle, None, 0).await;
        answer(&mut handle, StatusCode::OK, |b| b.clone()).await
    };
    let (result, status) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(reconcile(gw, ctx.clone()), server)
    })
    .await
    .expect("reconcile finished");
    result.expect("reconciled");
    let programmed = &status.body["status"]["conditions"][1];
    assert_eq!(programmed["type"], "Programmed");
    assert_eq!(programmed["status"], "False");
    assert_eq!(programmed["reason"], "AddressNotAssigned");
    assert_eq!(
        status.body["status"]["addresses"],
        json!([{"type": "Hostname", "value": "egress-wp.istio-egress.svc.cluster.local"}])
    );
    assert_eq!(ctx.metrics().count(Outcome::Pending), 1);
}

#[tokio::test]
async fn an_unchanged_status_is_not_rewritten() {
    let (ctx, mut handle) = context();
    // First pass, to learn the status we write.
    let server = async {
        serve_applies(&mut handle, Some("10.96.12.34"), 1).await;
        answer(&mut handle, StatusCode::OK, |b| b.clone()).await
    };
    let (result, status) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(
            reconcile(Arc::new(gateway("istio-waypoint")), ctx.clone()),
            server
        )
    })
    .await
    .expect("first reconcile finished");
    result.expect("reconciled");

    // Second pass: the Gateway now carries that status; the applies happen, the status patch not.
    let mut gw = gateway("istio-waypoint");
    gw.status = Some(serde_json::from_value(status.body["status"].clone()).expect("status"));
    let (result, _) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(
            reconcile(Arc::new(gw), ctx.clone()),
            serve_applies(&mut handle, Some("10.96.12.34"), 1)
        )
    })
    .await
    .expect("second reconcile finished");
    result.expect("reconciled");
    drop(ctx);
    assert!(handle.next_request().await.is_none(), "no status patch");
}

#[tokio::test]
async fn a_gateway_of_another_class_produces_no_requests() {
    let (ctx, mut handle) = context();
    let result = tokio::time::timeout(
        TEST_TIMEOUT,
        reconcile(Arc::new(gateway("istio")), ctx.clone()),
    )
    .await
    .expect("reconcile finished without waiting on the API");
    assert_eq!(result.expect("ignored"), Action::await_change());
    assert_eq!(ctx.metrics().count(Outcome::Ignored), 1);
    drop(ctx);
    assert!(handle.next_request().await.is_none());
}

fn owned_object(api_version: &str, kind: &str, uid: &str, owner_uid: &str) -> Value {
    json!({
        "apiVersion": api_version, "kind": kind,
        "metadata": {
            "name": "egress-wp", "namespace": "istio-egress", "uid": uid,
            "labels": {"strait.dev/managed-by": "waypoint-controller",
                       "gateway.networking.k8s.io/gateway-name": "egress-wp"},
            "ownerReferences": [{"apiVersion": "gateway.networking.k8s.io/v1", "kind": "Gateway",
                                 "name": "egress-wp", "uid": owner_uid, "controller": true}]
        }
    })
}

fn assert_delete(seen: &Seen, path: &str, uid: &str) {
    assert_eq!(seen.method, Method::DELETE, "{path}");
    assert_eq!(seen.path, path);
    assert_eq!(seen.body["propagationPolicy"], "Background", "{path}");
    assert_eq!(seen.body["preconditions"]["uid"], uid, "{path}");
}

fn assert_get(seen: &Seen, path: &str) {
    assert_eq!(seen.method, Method::GET, "{path}");
    assert_eq!(seen.path, path);
}

#[tokio::test]
async fn a_terminating_gateway_has_its_objects_deleted_idempotently() {
    let (ctx, mut handle) = context();
    let mut gw = gateway("istio-waypoint");
    gw.metadata.deletion_timestamp = Some(Time(Timestamp::UNIX_EPOCH));
    let deployments = "/apis/apps/v1/namespaces/istio-egress/deployments/egress-wp";
    let services = "/api/v1/namespaces/istio-egress/services/egress-wp";
    let accounts = "/api/v1/namespaces/istio-egress/serviceaccounts/egress-wp";
    let server = async {
        let mut seen = Vec::new();
        // Deployment: ours, deleted.
        seen.push(
            answer(&mut handle, StatusCode::OK, |_| {
                owned_object("apps/v1", "Deployment", "d-uid", "gw-uid-1")
            })
            .await,
        );
        seen.push(
            answer(
                &mut handle,
                StatusCode::OK,
                |_| json!({"kind": "Status", "apiVersion": "v1", "status": "Success"}),
            )
            .await,
        );
        // Service: GC got there first.
        seen.push(
            answer(&mut handle, StatusCode::NOT_FOUND, |_| {
                not_found("services")
            })
            .await,
        );
        // ServiceAccount: ours, but gone between the read and the delete.
        seen.push(
            answer(&mut handle, StatusCode::OK, |_| {
                owned_object("v1", "ServiceAccount", "sa-uid", "gw-uid-1")
            })
            .await,
        );
        seen.push(
            answer(&mut handle, StatusCode::NOT_FOUND, |_| {
                not_found("serviceaccounts")
            })
            .await,
        );
        seen
    };
    let (result, seen) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(reconcile(Arc::new(gw), ctx.clone()), server)
    })
    .await
    .expect("reconcile finished");
    assert_eq!(result.expect("deleted"), Action::await_change());
    assert_get(&seen[0], deployments);
    assert_delete(&seen[1], deployments, "d-uid");
    assert_get(&seen[2], services);
    assert_get(&seen[3], accounts);
    assert_delete(&seen[4], accounts, "sa-uid");
    assert_eq!(ctx.metrics().count(Outcome::Deleted), 1);
    drop(ctx);
    assert!(
        handle.next_request().await.is_none(),
        "no applies, no status"
    );
}

fn managed_by_us(mut gw: Gateway) -> Gateway {
    gw.metadata.managed_fields = Some(vec![
        serde_json::from_value(json!({
            "manager": "strait-waypoint-controller", "operation": "Apply",
            "apiVersion": "gateway.networking.k8s.io/v1", "subresource": "status",
            "fieldsType": "FieldsV1",
            "fieldsV1": {"f:status": {"f:addresses": {}, "f:conditions": {}}}
        }))
        .expect("managed fields entry"),
    ]);
    gw
}

#[tokio::test]
async fn a_gateway_that_changed_class_loses_its_waypoint_and_our_status() {
    let (ctx, mut handle) = context();
    let gw = managed_by_us(gateway("some-other-class"));
    let server = async {
        let mut seen = Vec::new();
        // A Deployment of the same name that is not ours (another controller's, old uid).
        seen.push(
            answer(&mut handle, StatusCode::OK, |_| {
                owned_object("apps/v1", "Deployment", "d-uid", "another-gateway-uid")
            })
            .await,
        );
        seen.push(
            answer(&mut handle, StatusCode::OK, |_| {
                owned_object("v1", "Service", "s-uid", "gw-uid-1")
            })
            .await,
        );
        seen.push(
            answer(
                &mut handle,
                StatusCode::OK,
                |_| json!({"kind": "Status", "status": "Success"}),
            )
            .await,
        );
        seen.push(
            answer(&mut handle, StatusCode::NOT_FOUND, |_| {
                not_found("serviceaccounts")
            })
            .await,
        );
        seen.push(answer(&mut handle, StatusCode::OK, |b| b.clone()).await);
        seen
    };
    let (result, seen) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(reconcile(Arc::new(gw), ctx.clone()), server)
    })
    .await
    .expect("reconcile finished");
    assert_eq!(result.expect("released"), Action::await_change());
    assert_get(
        &seen[0],
        "/apis/apps/v1/namespaces/istio-egress/deployments/egress-wp",
    );
    // No delete for the Deployment that is not ours: the next request is the Service read.
    assert_get(
        &seen[1],
        "/api/v1/namespaces/istio-egress/services/egress-wp",
    );
    assert_delete(
        &seen[2],
        "/api/v1/namespaces/istio-egress/services/egress-wp",
        "s-uid",
    );
    assert_get(
        &seen[3],
        "/api/v1/namespaces/istio-egress/serviceaccounts/egress-wp",
    );
    let release = &seen[4];
    assert_apply(
        release,
        "/apis/gateway.networking.k8s.io/v1/namespaces/istio-egress/gateways/egress-wp/status",
    );
    assert!(
        release.body.get("status").is_none(),
        "an apply without status releases our fields"
    );
    assert_eq!(ctx.metrics().count(Outcome::Released), 1);
    drop(ctx);
    assert!(handle.next_request().await.is_none());
}

#[tokio::test]
async fn api_errors_fail_the_reconcile_and_back_off() {
    let (ctx, mut handle) = context();
    let gw = Arc::new(gateway("istio-waypoint"));
    let server = async {
        answer(&mut handle, StatusCode::FORBIDDEN, |_| {
            json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "serviceaccounts is forbidden", "reason": "Forbidden", "code": 403})
        })
        .await
    };
    let (result, _) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(reconcile(gw.clone(), ctx.clone()), server)
    })
    .await
    .expect("reconcile finished");
    let error = result.expect_err("a 403 fails the reconcile");
    assert!(
        matches!(&error, Error::Kube(kube::Error::Api(s)) if s.code == 403),
        "{error:?}"
    );
    assert_eq!(ctx.metrics().count(Outcome::Error), 1);
    assert_eq!(
        error_policy(gw.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        error_policy(gw.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    assert_eq!(
        error_policy(gw, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(4))
    );
}

#[tokio::test]
async fn an_invalid_gateway_makes_no_requests_and_waits_for_an_edit() {
    let (ctx, mut handle) = context();
    let mut gw = gateway("istio-waypoint");
    gw.metadata.name = Some("not.a.service.name".to_owned());
    let gw = Arc::new(gw);
    let result = tokio::time::timeout(TEST_TIMEOUT, reconcile(gw.clone(), ctx.clone()))
        .await
        .expect("reconcile finished");
    let error = result.expect_err("invalid");
    assert!(matches!(error, Error::Invalid(InvalidGateway::Name(_))));
    assert_eq!(
        error_policy(gw, &error, ctx.clone()),
        Action::await_change()
    );
    assert_eq!(ctx.metrics().count(Outcome::Invalid), 1);
    drop(ctx);
    assert!(handle.next_request().await.is_none());
}

#[test]
fn backoff_doubles_and_caps() {
    let cases = [
        (0, 1),
        (1, 1),
        (2, 2),
        (3, 4),
        (9, 256),
        (10, 300),
        (u32::MAX, 300),
    ];
    for (attempt, seconds) in cases {
        assert_eq!(
            backoff_delay(attempt),
            Duration::from_secs(seconds),
            "attempt {attempt}"
        );
    }
}

#[test]
fn ownership_needs_our_label_and_a_controller_reference_to_this_gateway() {
    let gw = GatewayRef {
        name: "egress-wp".to_owned(),
        namespace: "istio-egress".to_owned(),
        uid: "gw-uid-1".to_owned(),
    };
    let meta = |value: Value| -> ObjectMeta {
        serde_json::from_value(value["metadata"].clone()).expect("metadata")
    };
    assert!(owned_by(
        &meta(owned_object("v1", "Service", "s", "gw-uid-1")),
        &gw
    ));
    assert!(!owned_by(
        &meta(owned_object("v1", "Service", "s", "other")),
        &gw
    ));
    let mut unlabelled = owned_object("v1", "Service", "s", "gw-uid-1");
    unlabelled["metadata"]["labels"] = json!({});
    assert!(!owned_by(&meta(unlabelled), &gw));
    let mut not_controller = owned_object("v1", "Service", "s", "gw-uid-1");
    not_controller["metadata"]["ownerReferences"][0]["controller"] = json!(false);
    assert!(!owned_by(&meta(not_controller), &gw));
}

const CLASS_STATUS_PATH: &str =
    "/apis/gateway.networking.k8s.io/v1/gatewayclasses/istio-waypoint/status";

/// A GatewayClass as the API server returns it right after creation: the CRD defaults the
/// Accepted condition to Unknown/Pending.
fn gateway_class(name: &str, controller: &str) -> GatewayClass {
    serde_json::from_value(json!({
        "apiVersion": "gateway.networking.k8s.io/v1",
        "kind": "GatewayClass",
        "metadata": {"name": name, "uid": "gc-uid-1", "generation": 2, "resourceVersion": "50"},
        "spec": {"controllerName": controller, "description": "strait waypoints"},
        "status": {"conditions": [{
            "type": "Accepted", "status": "Unknown", "reason": "Pending",
            "message": "Waiting for controller", "lastTransitionTime": "1970-01-01T00:00:00Z"
        }]}
    }))
    .expect("gateway class parses")
}

#[tokio::test]
async fn our_gateway_class_is_accepted_with_one_status_apply() {
    let (ctx, mut handle) = context();
    let class = Arc::new(gateway_class("istio-waypoint", desired::CONTROLLER_NAME));
    let (result, seen) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(
            reconcile_class(class, ctx.clone()),
            answer(&mut handle, StatusCode::OK, |b| b.clone())
        )
    })
    .await
    .expect("reconcile finished");
    assert_eq!(result.expect("reconciled"), Action::requeue(RESYNC));

    assert_apply(&seen, CLASS_STATUS_PATH);
    let mut body = seen.body;
    // The transition time is "now": a real time, not the CRD's placeholder epoch.
    let transition = body["status"]["conditions"][0]
        .as_object_mut()
        .and_then(|c| c.remove("lastTransitionTime"))
        .expect("lastTransitionTime");
    let transition: Timestamp = transition
        .as_str()
        .expect("a string")
        .parse()
        .expect("an RFC 3339 time");
    assert!(transition > Timestamp::UNIX_EPOCH, "{transition}");
    assert_eq!(
        body,
        json!({
            "apiVersion": "gateway.networking.k8s.io/v1",
            "kind": "GatewayClass",
            "metadata": {"name": "istio-waypoint"},
            "status": {"conditions": [{
                "type": "Accepted", "status": "True", "reason": "Accepted",
                "message": "handled by the strait waypoint controller",
                "observedGeneration": 2
            }]}
        }),
        "only our condition, no spec"
    );
    drop(ctx);
    assert!(handle.next_request().await.is_none(), "exactly one request");
}

#[tokio::test]
async fn an_accepted_gateway_class_is_not_rewritten() {
    let (ctx, mut handle) = context();
    let mut class = gateway_class("istio-waypoint", desired::CONTROLLER_NAME);
    let accepted: GatewayClassStatus = serde_json::from_value(json!({"conditions": [
        {"type": "Accepted", "status": "True", "reason": "Accepted",
         "message": "handled by the strait waypoint controller", "observedGeneration": 2,
         "lastTransitionTime": "2026-11-23T10:00:00Z"},
        // Another writer's condition does not make ours differ.
        {"type": "SupportedVersion", "status": "True", "reason": "SupportedVersion",
         "message": "", "observedGeneration": 2, "lastTransitionTime": "2026-11-23T10:00:00Z"}
    ]}))
    .expect("status parses");
    class.status = Some(accepted);
    let result = tokio::time::timeout(TEST_TIMEOUT, reconcile_class(Arc::new(class), ctx.clone()))
        .await
        .expect("reconcile finished without waiting on the API");
    assert_eq!(result.expect("reconciled"), Action::requeue(RESYNC));
    drop(ctx);
    assert!(handle.next_request().await.is_none(), "no status patch");
}

#[tokio::test]
async fn gateway_classes_that_are_not_ours_get_no_request() {
    // (name, controllerName): Istio's class of our name, and a class naming us under another
    // name (a second strait controller's, run with another --gateway-class).
    let cases = [
        ("istio-waypoint", "istio.io/mesh-controller"),
        ("istio-waypoint", ""),
        ("strait-b", desired::CONTROLLER_NAME),
    ];
    for (name, controller) in cases {
        let (ctx, mut handle) = context();
        let class = Arc::new(gateway_class(name, controller));
        let result = tokio::time::timeout(TEST_TIMEOUT, reconcile_class(class, ctx.clone()))
            .await
            .expect("reconcile finished without waiting on the API");
        assert_eq!(
            result.expect("ignored"),
            Action::await_change(),
            "{name} {controller}"
        );
        drop(ctx);
        assert!(
            handle.next_request().await.is_none(),
            "{name} {controller}: left alone"
        );
    }
}

#[tokio::test]
async fn gateway_class_api_errors_back_off() {
    let (ctx, mut handle) = context();
    let class = Arc::new(gateway_class("istio-waypoint", desired::CONTROLLER_NAME));
    let (result, seen) = tokio::time::timeout(TEST_TIMEOUT, async {
        tokio::join!(
            reconcile_class(class.clone(), ctx.clone()),
            answer(&mut handle, StatusCode::FORBIDDEN, |_| {
                json!({"kind": "Status", "apiVersion": "v1", "status": "Failure",
                   "message": "gatewayclasses.gateway.networking.k8s.io \"istio-waypoint\" is forbidden",
                   "reason": "Forbidden", "code": 403})
            })
        )
    })
    .await
    .expect("reconcile finished");
    assert_apply(&seen, CLASS_STATUS_PATH);
    let error = result.expect_err("a 403 fails the reconcile");
    assert!(
        matches!(&error, Error::Kube(kube::Error::Api(s)) if s.code == 403),
        "{error:?}"
    );
    assert_eq!(
        class_error_policy(class.clone(), &error, ctx.clone()),
        Action::requeue(Duration::from_secs(1))
    );
    assert_eq!(
        class_error_policy(class, &error, ctx.clone()),
        Action::requeue(Duration::from_secs(2))
    );
    // The class's backoff is its own: a Gateway's first failure starts at 1 s.
    let gw_error = Error::Kube(kube::Error::Api(
        serde_json::from_value(
            json!({"status": "Failure", "message": "boom", "reason": "InternalError", "code": 500}),
        )
        .expect("status"),
    ));
    assert_eq!(
        error_policy(Arc::new(gateway("istio-waypoint")), &gw_error, ctx),
        Action::requeue(Duration::from_secs(1))
    );
}
