//! The loader never panics: random bytes, random YAML, and random objects built from real
//! field names so the typed paths are exercised.
use proptest::prelude::*;
use serde_yaml_ng::{Mapping, Value};

const KINDS: &[(&str, &str)] = &[
    ("v1", "Namespace"),
    ("v1", "Service"),
    ("v1", "Pod"),
    ("v1", "ConfigMap"),
    ("networking.istio.io/v1", "ServiceEntry"),
    ("networking.istio.io/v1beta1", "DestinationRule"),
    ("networking.istio.io/v1alpha3", "VirtualService"),
    ("security.istio.io/v1", "AuthorizationPolicy"),
    ("gateway.networking.k8s.io/v1", "Gateway"),
    ("gateway.networking.k8s.io/v1", "HTTPRoute"),
    ("istio.alibabacloud.com/v1beta1", "ASMEgressTrafficPolicy"),
];

const KEYS: &[&str] = &[
    "hosts",
    "addresses",
    "ports",
    "number",
    "name",
    "protocol",
    "targetPort",
    "resolution",
    "location",
    "endpoints",
    "address",
    "http",
    "tcp",
    "tls",
    "match",
    "uri",
    "prefix",
    "exact",
    "regex",
    "route",
    "destination",
    "host",
    "weight",
    "port",
    "fault",
    "delay",
    "percent",
    "fixedDelay",
    "abort",
    "httpStatus",
    "percentage",
    "value",
    "trafficPolicy",
    "portLevelSettings",
    "mode",
    "sni",
    "rules",
    "from",
    "to",
    "source",
    "operation",
    "when",
    "key",
    "values",
    "principals",
    "ipBlocks",
    "action",
    "selector",
    "matchLabels",
    "targetRefs",
    "kind",
    "group",
    "listeners",
    "allowedRoutes",
    "namespaces",
    "gatewayClassName",
    "parentRefs",
    "backendRefs",
    "matches",
    "path",
    "type",
    "filters",
    "egressRules",
    "byEgressGateway",
    "httpsUpgrade",
    "enabled",
    "workloadSelector",
    "namespace",
    "labels",
    "annotations",
    "clusterIP",
    "selector",
    "podIP",
    "nodeName",
    "serviceAccountName",
    "data",
    "mesh",
    "timeout",
    "retries",
    "attempts",
    "mirror",
    "redirect",
    "rewrite",
    "headers",
    "set",
    "add",
    "remove",
    "subsets",
    "connectionPool",
    "outlierDetection",
    "loadBalancer",
    "simple",
    "exportTo",
    "gateways",
];

fn leaf() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|i| Value::Number(i.into())),
        (0u32..70000).prop_map(|i| Value::Number(i.into())),
        any::<f64>().prop_map(|f| Value::Number(f.into())),
        "[a-z0-9.*/:-]{0,12}".prop_map(Value::String),
        prop::sample::select(vec![
            "10.0.0.0/8",
            "240.240.0.1",
            "HTTP",
            "TCP",
            "DNS",
            "STATIC",
            "SIMPLE",
            "ALLOW",
            "DENY",
            "5s",
            "*",
            "istio-waypoint",
            "HBONE",
            "/run/netns/x",
            "(",
            "none"
        ])
        .prop_map(|s| Value::String(s.into())),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    leaf().prop_recursive(5, 64, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(Value::Sequence),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..6).prop_map(|kv| {
                let mut m = Mapping::new();
                for (k, v) in kv {
                    m.insert(Value::String(k.into()), v);
                }
                Value::Mapping(m)
            }),
        ]
    })
}

fn object() -> impl Strategy<Value = String> {
    (
        prop::sample::select(KINDS),
        "[a-z][a-z0-9-]{0,8}",
        prop::option::of("[a-z]{1,6}"),
        value(),
        value(),
    )
        .prop_map(|((av, kind), name, ns, spec, status)| {
            let mut meta = Mapping::new();
            meta.insert("name".into(), Value::String(name));
            if let Some(ns) = ns {
                meta.insert("namespace".into(), Value::String(ns));
            }
            let mut m = Mapping::new();
            m.insert("apiVersion".into(), av.into());
            m.insert("kind".into(), kind.into());
            m.insert("metadata".into(), Value::Mapping(meta));
            m.insert("spec".into(), spec);
            m.insert("status".into(), status);
            serde_yaml_ng::to_string(&Value::Mapping(m)).unwrap_or_default()
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, .. ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let text = String::from_utf8_lossy(&bytes);
        let _ = mesh_config::load_sources([("x/f.yaml", text.as_ref())]);
    }

    #[test]
    fn random_yaml_never_panics(v in value()) {
        let text = serde_yaml_ng::to_string(&v).unwrap_or_default();
        let _ = mesh_config::load_sources([("f.yaml", text.as_str())]);
    }

    #[test]
    fn random_objects_never_panic(docs in prop::collection::vec(object(), 1..6)) {
        let text = docs.join("---\n");
        let _ = mesh_config::load_sources([("ns1/f.yaml", text.as_str())]);
    }
}
