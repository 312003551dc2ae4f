//! The cluster manifests under `deploy/`.
//!
//! - Every document is valid against the Kubernetes 1.33 OpenAPI schemas, strictly (an unknown
//!   field is an error), with `kubernetes-validate` (PyPI; it bundles the schemas and works
//!   offline). The GatewayClass, not a core kind, is checked against the Gateway API v1 rules for
//!   its few fields (below).
//! - Every ASMEgressTrafficPolicy of the seeds validates against our CRD's `openAPIV3Schema`
//!   (python `jsonschema`, which kubernetes-validate depends on), unknown fields rejected as the
//!   API server's strict field validation does; broken policies are rejected by the CRD *and* by
//!   mesh-config, so the CRD and the data plane accept the same objects.
//! - The privileges asked for are the ones documented: capabilities, hostPID, RBAC verbs; the
//!   flags passed are flags the real binaries have (`--help` of the built binaries).
//!
//! Without `python3` and its modules `kubernetes_validate` + `jsonschema`: skipped loudly, a
//! failure under `CI=true` (install: [`INSTALL`]).

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde::Deserialize;
use serde_json::{Value, json};

const K8S_VERSION: &str = "1.33";
/// How CI installs the validator (it bundles the Kubernetes schemas and needs no network after).
const INSTALL: &str = "python3 -m pip install kubernetes-validate==1.37.0";
const ASM_API_VERSION: &str = "istio.alibabacloud.com/v1beta1";
const ASM_KIND: &str = "ASMEgressTrafficPolicy";
/// Kinds the Kubernetes schemas do not have, and how they are checked instead.
const NON_CORE_KINDS: &[&str] = &["GatewayClass"];

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| v.eq_ignore_ascii_case("true") || v == "1")
}

/// Same rule as the lab's gate: a failure under CI, a loud skip elsewhere.
fn skip_or_fail(why: &str) -> bool {
    assert!(
        !in_ci(),
        "CI=true and this test {why}: a missing tool is a failure in CI"
    );
    eprintln!("\n************************************************************");
    eprintln!("*** SKIPPED: {why}");
    eprintln!("************************************************************\n");
    false
}

/// `python3` with the `kubernetes_validate` and `jsonschema` modules (run as `python3 -m …`, so
/// no console script needs to be on PATH).
fn python_tools_available() -> bool {
    if !mesh_tests::require_tools(&["python3"]) {
        return false;
    }
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes_validate, jsonschema"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || skip_or_fail(&format!(
        "needs the python3 modules kubernetes_validate and jsonschema ({INSTALL})"
    ))
}

// ---------------------------------------------------------------------------------------------
// Documents

#[derive(Debug, Clone)]
struct Doc {
    file: PathBuf,
    value: Value,
}

impl Doc {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or_default()
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or_default()
    }
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let entries = std::fs::read_dir(&d).unwrap_or_else(|e| panic!("{}: {e}", d.display()));
        for entry in entries {
            let path = entry.expect("dir entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.extension().is_some_and(|e| e == "yaml" || e == "yml") {
                out.push(path);
            }
        }
    }
    out.sort();
    out
}

fn parse_docs(file: &Path) -> Vec<Doc> {
    let text = std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", file.display())))
        .filter(|v| !v.is_null())
        .map(|value| Doc {
            file: file.to_owned(),
            value,
        })
        .collect()
}

fn deploy_docs() -> Vec<Doc> {
    let files = yaml_files(&repo_root().join("deploy"));
    assert!(!files.is_empty(), "no YAML under deploy/");
    files.iter().flat_map(|f| parse_docs(f)).collect()
}

fn find<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Doc {
    docs.iter()
        .find(|d| d.kind() == kind && d.name() == name)
        .unwrap_or_else(|| panic!("deploy/ has no {kind} {name}"))
}

/// Every ASMEgressTrafficPolicy of the seeds (their YAML blocks, extracted verbatim for
/// mesh-config's tests).
fn seed_policies() -> Vec<Doc> {
    let dir = repo_root().join("crates/mesh-config/tests/fixtures/seeds");
    let docs: Vec<Doc> = yaml_files(&dir)
        .iter()
        .flat_map(|f| parse_docs(f))
        .filter(|d| d.kind() == ASM_KIND)
        .collect();
    // Seed 003 has three examples; fewer means the fixtures moved and this test lost them.
    assert!(
        docs.len() >= 3,
        "expected the 3 ASMEgressTrafficPolicies of seed 003 under {}, found {}",
        dir.display(),
        docs.len()
    );
    for d in &docs {
        assert_eq!(
            d.value["apiVersion"],
            ASM_API_VERSION,
            "{}",
            d.file.display()
        );
    }
    docs
}

// ---------------------------------------------------------------------------------------------
// kubernetes-validate

struct KvReport {
    success: bool,
    output: String,
}

fn kubernetes_validate(files: &[PathBuf]) -> KvReport {
    let out = Command::new("python3")
        .args([
            "-m",
            "kubernetes_validate",
            "--strict",
            "--kubernetes-version",
        ])
        .arg(K8S_VERSION)
        .args(files)
        .output()
        .expect("run python3 -m kubernetes_validate");
    KvReport {
        success: out.status.success(),
        output: format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    }
}

fn write_docs(dir: &Path, name: &str, docs: &[&Value]) -> PathBuf {
    let path = dir.join(name);
    // JSON documents are YAML documents.
    let text: Vec<String> = docs
        .iter()
        .map(|d| serde_json::to_string_pretty(d).expect("json"))
        .collect();
    std::fs::write(&path, text.join("\n---\n")).expect("write");
    path
}

#[test]
fn manifests_are_valid_kubernetes_1_33_objects_strictly() {
    if !python_tools_available() {
        return;
    }
    let files = yaml_files(&repo_root().join("deploy"));
    let docs = deploy_docs();
    let report = kubernetes_validate(&files);
    eprintln!("{}", report.output);
    assert!(
        report.success,
        "kubernetes-validate failed:\n{}",
        report.output
    );
    assert!(!report.output.contains("ERROR"), "{}", report.output);

    // Each core document was really checked (not skipped for want of a schema).
    let passed = report
        .output
        .lines()
        .filter(|l| l.contains(" passed for resource "))
        .count();
    let core = docs
        .iter()
        .filter(|d| !NON_CORE_KINDS.contains(&d.kind()))
        .count();
    assert_eq!(passed, core, "{}", report.output);
    for line in report
        .output
        .lines()
        .filter(|l| l.contains("Couldn't find schema"))
    {
        assert!(
            NON_CORE_KINDS
                .iter()
                .any(|k| line.contains(&format!("kind {k} "))),
            "a document of a kind with no schema: {line}"
        );
    }
}

#[test]
fn the_validator_rejects_unknown_fields_and_wrong_types() {
    if !python_tools_available() {
        return;
    }
    let docs = deploy_docs();
    let dir = tempfile::tempdir().expect("tempdir");

    let mut ds = find(&docs, "DaemonSet", "ztunnel").value.clone();
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["capabilitiez"] =
        json!({"add": ["NET_ADMIN"]});
    let mut deploy = find(&docs, "Deployment", "waypoint-controller")
        .value
        .clone();
    deploy["spec"]["replicas"] = json!("one");
    let mut crd = find(
        &docs,
        "CustomResourceDefinition",
        "asmegresstrafficpolicies.istio.alibabacloud.com",
    )
    .value
    .clone();
    crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]["requird"] =
        json!(["egressRules"]);
    let mut role = find(&docs, "ClusterRole", "strait-mesh-reader")
        .value
        .clone();
    role["rules"][0]["verb"] = json!(["get"]);

    for (what, doc, reason) in [
        (
            "unknown field in a container's securityContext",
            &ds,
            "'capabilitiez' was unexpected",
        ),
        ("a string where an integer belongs", &deploy, "replicas"),
        (
            "a misspelt keyword in the CRD's schema",
            &crd,
            "'requird' was unexpected",
        ),
        (
            "unknown field in an RBAC rule",
            &role,
            "'verb' was unexpected",
        ),
    ] {
        let file = write_docs(dir.path(), "broken.yaml", &[doc]);
        let report = kubernetes_validate(&[file]);
        assert!(
            !report.success
                && report
                    .output
                    .lines()
                    .any(|l| l.starts_with("ERROR") && l.contains(reason)),
            "{what}: kubernetes-validate did not reject it for {reason:?}:\n{}",
            report.output
        );
    }
}

// ---------------------------------------------------------------------------------------------
// JSON-schema validation (our CRD, the GatewayClass)

const JSONSCHEMA_PY: &str = r#"
import json, sys
import jsonschema
req = json.load(sys.stdin)
jsonschema.Draft4Validator.check_schema(req["schema"])
v = jsonschema.Draft4Validator(req["schema"])
out = []
for d in req["docs"]:
    errs = sorted(v.iter_errors(d), key=lambda e: [str(p) for p in e.absolute_path])
    out.append([".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in errs])
json.dump(out, sys.stdout)
"#;

/// The errors of each of `docs` against `schema` (JSON Schema draft 4, which OpenAPI v3 schemas
/// of CRDs are a subset of; `x-kubernetes-*` and `format` are not checked).
fn jsonschema_errors(schema: &Value, docs: &[&Value]) -> Vec<Vec<String>> {
    let mut child = Command::new("python3")
        .args(["-c", JSONSCHEMA_PY])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3");
    let input = json!({"schema": schema, "docs": docs});
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.to_string().as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("python3");
    assert!(
        out.status.success(),
        "python3 jsonschema failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let errors: Vec<Vec<String>> = serde_json::from_slice(&out.stdout).expect("python output");
    assert_eq!(errors.len(), docs.len());
    errors
}

fn crd_schema(docs: &[Doc]) -> Value {
    let crd = find(
        docs,
        "CustomResourceDefinition",
        "asmegresstrafficpolicies.istio.alibabacloud.com",
    );
    let spec = &crd.value["spec"];
    // Names exactly as the seeds (and kube-source) use them.
    assert_eq!(spec["group"], "istio.alibabacloud.com");
    assert_eq!(spec["scope"], "Namespaced");
    assert_eq!(spec["names"]["kind"], ASM_KIND);
    assert_eq!(spec["names"]["plural"], "asmegresstrafficpolicies");
    let versions = spec["versions"].as_array().expect("versions");
    assert_eq!(versions.len(), 1);
    assert_eq!(versions[0]["name"], "v1beta1");
    assert_eq!(
        format!(
            "{}/{}",
            spec["group"].as_str().unwrap_or_default(),
            "v1beta1"
        ),
        ASM_API_VERSION
    );
    versions[0]["schema"]["openAPIV3Schema"].clone()
}

/// The API server drops fields a CRD schema does not declare (with a warning, kubectl's default)
/// or rejects them (`kubectl apply --validate=strict`); JSON Schema allows them unless told
/// otherwise. Structural schemas may not say `additionalProperties: false` themselves, so it is
/// added here, to every node with `properties`, as strict validation behaves.
fn strict(schema: &mut Value) {
    let Some(obj) = schema.as_object_mut() else {
        return;
    };
    let preserve = obj
        .get("x-kubernetes-preserve-unknown-fields")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    if obj.contains_key("properties") && !preserve && !obj.contains_key("additionalProperties") {
        obj.insert("additionalProperties".into(), Value::Bool(false));
    }
    if let Some(props) = obj.get_mut("properties").and_then(Value::as_object_mut) {
        props.values_mut().for_each(strict);
    }
    if let Some(items) = obj.get_mut("items") {
        strict(items);
    }
    if let Some(ap) = obj.get_mut("additionalProperties") {
        strict(ap);
    }
}

/// What the API server requires of a CRD schema (structural: every node typed, no
/// `additionalProperties` beside `properties`, never `additionalProperties: false`), plus our
/// own rule that every field is described.
fn structural_problems(schema: &Value, path: &str, out: &mut Vec<String>) {
    let Some(obj) = schema.as_object() else {
        out.push(format!("{path}: not an object"));
        return;
    };
    let untyped_ok = obj.get("x-kubernetes-int-or-string") == Some(&Value::Bool(true))
        || obj.get("x-kubernetes-preserve-unknown-fields") == Some(&Value::Bool(true));
    let ty = obj.get("type").and_then(Value::as_str);
    if ty.is_none() && !untyped_ok {
        out.push(format!("{path}: no type"));
    }
    if obj.contains_key("properties") && obj.contains_key("additionalProperties") {
        out.push(format!("{path}: both properties and additionalProperties"));
    }
    if obj.get("additionalProperties") == Some(&Value::Bool(false)) {
        out.push(format!(
            "{path}: additionalProperties: false is not structural"
        ));
    }
    if (ty == Some("array")) != obj.contains_key("items") {
        out.push(format!("{path}: items exactly when type is array"));
    }
    for forbidden in ["$ref", "definitions", "oneOf", "anyOf", "allOf", "not"] {
        if obj.contains_key(forbidden) {
            out.push(format!("{path}: {forbidden} is not used in our schema"));
        }
    }
    if let Some(props) = obj.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = format!("{path}.{name}");
            // metadata is ObjectMeta, validated by the API server itself.
            if name != "metadata" && sub.get("description").is_none() {
                out.push(format!("{p}: no description"));
            }
            structural_problems(sub, &p, out);
        }
        for r in obj
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let r = r.as_str().unwrap_or_default();
            if !props.contains_key(r) {
                out.push(format!("{path}: required {r} is not a property"));
            }
        }
    }
    if let Some(items) = obj.get("items") {
        structural_problems(items, &format!("{path}[]"), out);
    }
    if let Some(ap @ Value::Object(_)) = obj.get("additionalProperties") {
        structural_problems(ap, &format!("{path}{{}}"), out);
    }
}

#[test]
fn the_crd_schema_is_structural_and_described() {
    let schema = crd_schema(&deploy_docs());
    let mut problems = Vec::new();
    structural_problems(&schema, "", &mut problems);
    assert!(problems.is_empty(), "{problems:#?}");

    // The checker itself can fail.
    let mut broken = schema.clone();
    broken["properties"]["spec"]["properties"]["egressRules"]
        .as_object_mut()
        .expect("egressRules")
        .remove("type");
    broken["properties"]["spec"]["additionalProperties"] = Value::Bool(false);
    let mut problems = Vec::new();
    structural_problems(&broken, "", &mut problems);
    assert!(
        problems.iter().any(|p| p == ".spec.egressRules: no type"),
        "{problems:#?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("additionalProperties: false")),
        "{problems:#?}"
    );
}

/// A policy that uses every field of the CRD.
const EVERY_FIELD: &str = r#"
apiVersion: istio.alibabacloud.com/v1beta1
kind: ASMEgressTrafficPolicy
metadata:
  name: every-field
  namespace: istio-egress
spec:
  byEgressGateway:
    name: egressgateway-a
  egressRules:
  - name: sleep-a-to-httpbin
    from:
    - namespace: mytest
      workloadSelector:
        app: sleep-a
    to:
    - name: httpbin-http
      hosts:
      - httpbin.org
      port:
        name: http
        number: 80
        protocol: HTTP
      byEgressGateway:
        port: 80
      httpsUpgrade:
        enabled: true
        port: 443
"#;

/// Every property path of `schema` that `doc` leaves unused.
fn unused_fields(schema: &Value, doc: &Value, path: &str, out: &mut Vec<String>) {
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        for (name, sub) in props {
            let p = format!("{path}.{name}");
            match doc.get(name) {
                Some(v) => unused_fields(sub, v, &p, out),
                None => out.push(p),
            }
        }
    }
    if let (Some(items), Some(arr)) = (schema.get("items"), doc.as_array()) {
        let mut per_item: Vec<Vec<String>> = Vec::new();
        for v in arr {
            let mut o = Vec::new();
            unused_fields(items, v, &format!("{path}[]"), &mut o);
            per_item.push(o);
        }
        // Unused only if no element uses it.
        if let Some(first) = per_item.first() {
            out.extend(
                first
                    .iter()
                    .filter(|p| per_item.iter().all(|o| o.contains(p)))
                    .cloned(),
            );
        }
    }
}

fn load_in_mesh_config(doc: &Value) -> Result<(), String> {
    let text = serde_json::to_string(doc).expect("json");
    mesh_config::load_sources([("policy.yaml", text.as_str())])
        .map(drop)
        .map_err(|e| {
            e.iter()
                .map(|e| format!("{e:?}"))
                .collect::<Vec<_>>()
                .join("\n")
        })
}

#[test]
fn seed_policies_validate_against_our_crd() {
    if !python_tools_available() {
        return;
    }
    let mut schema = crd_schema(&deploy_docs());
    strict(&mut schema);
    let seeds = seed_policies();
    let every: Value = serde_yaml_ng::from_str(EVERY_FIELD).expect("yaml");

    let mut unused = Vec::new();
    unused_fields(&schema, &every, "", &mut unused);
    assert!(
        unused.is_empty(),
        "EVERY_FIELD must use every field of the CRD: {unused:?}"
    );
    load_in_mesh_config(&every).expect("mesh-config accepts every field of the CRD");

    let docs: Vec<&Value> = seeds
        .iter()
        .map(|d| &d.value)
        .chain(std::iter::once(&every))
        .collect();
    let errors = jsonschema_errors(&schema, &docs);
    for (doc, errs) in docs.iter().zip(&errors) {
        assert!(
            errs.is_empty(),
            "{} rejected by the CRD: {errs:#?}",
            doc["metadata"]["name"]
        );
    }
}

type Mutation = fn(&mut Value);

fn to0(p: &mut Value) -> &mut Value {
    &mut p["spec"]["egressRules"][0]["to"][0]
}

fn remove(v: &mut Value, key: &str) -> Option<Value> {
    v.as_object_mut().and_then(|o| o.remove(key))
}

/// Broken policies: what is wrong, the change, a fragment the CRD's error must name (so it is
/// rejected for that reason), and whether mesh-config rejects it too (`false` only where the CRD
/// follows the guide's "required" and mesh-config has a default).
const BROKEN: &[(&str, Mutation, &str, bool)] = &[
    (
        "misspelt field",
        |p| {
            let rules = remove(&mut p["spec"], "egressRules").expect("egressRules");
            p["spec"]["egressRule"] = rules;
        },
        "'egressRule' was unexpected",
        true,
    ),
    (
        "no egress rules",
        |p| p["spec"]["egressRules"] = json!([]),
        "spec.egressRules:",
        true,
    ),
    (
        "no gateway",
        |p| drop(remove(&mut p["spec"], "byEgressGateway")),
        "'byEgressGateway' is a required property",
        true,
    ),
    (
        "gateway port at spec level",
        |p| p["spec"]["byEgressGateway"]["port"] = json!(80),
        "'port' was unexpected",
        true,
    ),
    (
        "gateway name of 33 characters",
        |p| p["spec"]["byEgressGateway"]["name"] = json!("a".repeat(33)),
        "spec.byEgressGateway.name:",
        true,
    ),
    (
        "gateway name in to[]",
        |p| to0(p)["byEgressGateway"]["name"] = json!("gw"),
        "'name' was unexpected",
        true,
    ),
    (
        "UDP",
        |p| to0(p)["port"]["protocol"] = json!("UDP"),
        "port.protocol:",
        true,
    ),
    (
        "port 0",
        |p| to0(p)["port"]["number"] = json!(0),
        "port.number:",
        true,
    ),
    (
        "port 70000",
        |p| to0(p)["port"]["number"] = json!(70000),
        "port.number:",
        true,
    ),
    (
        "port as a string",
        |p| to0(p)["port"]["number"] = json!("80"),
        "port.number:",
        true,
    ),
    (
        "wildcard host",
        |p| to0(p)["hosts"] = json!(["*.example.com"]),
        "hosts.0:",
        true,
    ),
    (
        "no hosts",
        |p| drop(remove(to0(p), "hosts")),
        "'hosts' is a required property",
        true,
    ),
    (
        "no destination",
        |p| p["spec"]["egressRules"][0]["to"] = json!([]),
        "egressRules.0.to:",
        true,
    ),
    (
        "source without namespace",
        |p| p["spec"]["egressRules"][0]["from"] = json!([{"workloadSelector": {"app": "x"}}]),
        "'namespace' is a required property",
        true,
    ),
    (
        "selector value not a string",
        |p| p["spec"]["egressRules"][0]["from"][0]["workloadSelector"] = json!({"app": ["x"]}),
        "workloadSelector.app:",
        true,
    ),
    (
        "httpsUpgrade.enabled as a string",
        |p| to0(p)["httpsUpgrade"] = json!({"enabled": "yes", "port": 443}),
        "httpsUpgrade.enabled:",
        true,
    ),
    (
        "httpsUpgrade without enabled",
        |p| to0(p)["httpsUpgrade"] = json!({"port": 443}),
        "'enabled' is a required property",
        false,
    ),
];

#[test]
fn broken_policies_are_rejected_by_the_crd_and_by_mesh_config() {
    if !python_tools_available() {
        return;
    }
    let mut schema = crd_schema(&deploy_docs());
    strict(&mut schema);
    let base: Value = serde_yaml_ng::from_str(EVERY_FIELD).expect("yaml");
    let broken: Vec<Value> = BROKEN
        .iter()
        .map(|(_, mutate, _, _)| {
            let mut p = base.clone();
            mutate(&mut p);
            assert_ne!(p, base);
            p
        })
        .collect();
    let errors = jsonschema_errors(&schema, &broken.iter().collect::<Vec<_>>());
    for (((what, _, reason, both), doc), errs) in BROKEN.iter().zip(&broken).zip(&errors) {
        assert!(
            errs.iter().any(|e| e.contains(reason)),
            "{what}: the CRD must reject it for {reason:?}, it said {errs:?}"
        );
        if *both {
            assert!(
                load_in_mesh_config(doc).is_err(),
                "{what}: rejected by the CRD but accepted by mesh-config"
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GatewayClass (not in the Kubernetes schemas; the Gateway API CRDs are not vendored)

/// GatewayClass as the Gateway API v1 (standard channel) CRD defines its fields.
fn gateway_class_schema() -> Value {
    json!({
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"enum": ["gateway.networking.k8s.io/v1"]},
            "kind": {"enum": ["GatewayClass"]},
            "metadata": {
                "type": "object",
                "required": ["name"],
                "properties": {
                    "name": {"type": "string"},
                    "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                    "annotations": {"type": "object", "additionalProperties": {"type": "string"}}
                }
            },
            "spec": {
                "type": "object",
                "required": ["controllerName"],
                "properties": {
                    "controllerName": {
                        "type": "string", "minLength": 1, "maxLength": 253,
                        "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*\\/[A-Za-z0-9\\/\\-._~%!$&'()*+,;=:]+$"
                    },
                    "description": {"type": "string", "maxLength": 64},
                    "parametersRef": {
                        "type": "object",
                        "required": ["group", "kind", "name"],
                        "properties": {
                            "group": {"type": "string", "maxLength": 253},
                            "kind": {"type": "string", "minLength": 1, "maxLength": 63},
                            "name": {"type": "string", "minLength": 1, "maxLength": 253},
                            "namespace": {"type": "string", "minLength": 1, "maxLength": 63}
                        }
                    }
                }
            }
        }
    })
}

#[test]
fn gateway_class_follows_gateway_api_v1() {
    if !python_tools_available() {
        return;
    }
    let docs = deploy_docs();
    let gc = &find(&docs, "GatewayClass", "istio-waypoint").value;
    // Istio's class name, so the seeds' Gateways apply verbatim.
    assert_eq!(gc["metadata"]["name"], "istio-waypoint");
    let mut schema = gateway_class_schema();
    strict(&mut schema);
    let mut long = gc.clone();
    long["spec"]["description"] = json!("x".repeat(65));
    let mut bad_name = gc.clone();
    bad_name["spec"]["controllerName"] = json!("no-domain-prefix");
    let mut unknown = gc.clone();
    unknown["spec"]["controller"] = json!("x/y");
    let errors = jsonschema_errors(&schema, &[gc, &long, &bad_name, &unknown]);
    assert!(errors[0].is_empty(), "{:#?}", errors[0]);
    for ((what, reason), errs) in [
        ("description too long", "spec.description:"),
        ("controllerName without a domain", "spec.controllerName:"),
        ("unknown field", "'controller' was unexpected"),
    ]
    .iter()
    .zip(&errors[1..])
    {
        assert!(
            errs.iter().any(|e| e.contains(reason)),
            "{what}: not rejected for {reason:?}: {errs:?}"
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Privileges and flags (no tools needed)

fn pod_spec<'a>(docs: &'a [Doc], kind: &str, name: &str) -> &'a Value {
    &find(docs, kind, name).value["spec"]["template"]["spec"]
}

fn strings(v: &Value) -> Vec<&str> {
    v.as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default()
}

/// The value after `flag` in `args`.
fn flag<'a>(args: &[&'a str], flag: &str) -> Option<&'a str> {
    args.iter()
        .position(|a| *a == flag)
        .and_then(|i| args.get(i + 1).copied())
}

#[test]
fn ztunnel_gets_exactly_the_documented_privileges() {
    let docs = deploy_docs();
    let ds = &find(&docs, "DaemonSet", "ztunnel").value;
    let pod = &ds["spec"]["template"]["spec"];
    assert_eq!(pod["hostPID"], true, "pods' netns are found through /proc");
    assert_ne!(
        pod["hostNetwork"], true,
        "ztunnel enters pod namespaces with setns"
    );
    assert_eq!(pod["priorityClassName"], "system-node-critical");
    assert_eq!(pod["tolerations"], json!([{"operator": "Exists"}]));
    assert_eq!(ds["spec"]["updateStrategy"]["type"], "RollingUpdate");
    assert_eq!(
        ds["spec"]["updateStrategy"]["rollingUpdate"]["maxUnavailable"],
        1
    );

    let containers = pod["containers"].as_array().expect("containers");
    assert_eq!(containers.len(), 1);
    let c = &containers[0];
    let sc = &c["securityContext"];
    assert_eq!(sc["privileged"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(strings(&sc["capabilities"]["drop"]), ["ALL"]);
    let added: BTreeSet<&str> = strings(&sc["capabilities"]["add"]).into_iter().collect();
    let documented: BTreeSet<&str> = ["NET_ADMIN", "NET_RAW", "SYS_ADMIN", "SYS_PTRACE"].into();
    assert_eq!(added, documented);
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).expect("README");
    for cap in &added {
        assert!(
            readme.contains(cap),
            "deploy/README.md does not justify {cap}"
        );
    }

    let args = strings(&c["args"]);
    assert_eq!(flag(&args, "--config-source"), Some("kube"));
    assert_eq!(flag(&args, "--node"), Some("$(NODE_NAME)"));
    assert_eq!(flag(&args, "--proc-root"), Some("/proc"));
    assert_eq!(
        flag(&args, "--admin"),
        Some("127.0.0.1:15000"),
        "admin stays local"
    );
    assert_eq!(
        c["env"],
        json!([{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}])
    );

    // The kubelet waits longer than ztunnel drains.
    let drain: u64 = flag(&args, "--drain-seconds")
        .expect("--drain-seconds")
        .parse()
        .expect("number");
    let grace = pod["terminationGracePeriodSeconds"]
        .as_u64()
        .expect("grace");
    assert!(grace > drain, "grace {grace}s <= drain {drain}s");

    // The readiness probe asks the readiness listener.
    let readiness = flag(&args, "--readiness").expect("--readiness");
    assert_eq!(readiness, "0.0.0.0:15021");
    assert_eq!(c["readinessProbe"]["httpGet"]["path"], "/healthz/ready");
    assert_eq!(c["readinessProbe"]["httpGet"]["port"], 15021);

    // The CA secret, read-only, where --ca-dir points.
    let ca_dir = flag(&args, "--ca-dir").expect("--ca-dir");
    let mount = c["volumeMounts"]
        .as_array()
        .expect("mounts")
        .iter()
        .find(|m| m["mountPath"] == ca_dir)
        .expect("a mount at --ca-dir");
    assert_eq!(mount["readOnly"], true);
    let volume = pod["volumes"]
        .as_array()
        .expect("volumes")
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the CA volume");
    assert_eq!(volume["secret"]["secretName"], "strait-ca");
}

#[test]
fn the_controller_runs_unprivileged() {
    let docs = deploy_docs();
    let dep = &find(&docs, "Deployment", "waypoint-controller").value;
    assert_eq!(dep["spec"]["replicas"], 1);
    let pod = &dep["spec"]["template"]["spec"];
    assert_eq!(pod["securityContext"]["runAsNonRoot"], true);
    assert_ne!(pod["hostPID"], true);
    assert_ne!(pod["hostNetwork"], true);
    let c = &pod["containers"][0];
    assert_eq!(c["securityContext"]["readOnlyRootFilesystem"], true);
    assert_eq!(c["securityContext"]["allowPrivilegeEscalation"], false);
    assert_eq!(
        strings(&c["securityContext"]["capabilities"]["drop"]),
        ["ALL"]
    );
    assert!(c["securityContext"]["capabilities"].get("add").is_none());
    let env = c["env"].as_array().expect("env");
    assert!(
        env.iter().any(|e| e["name"] == "WAYPOINT_IMAGE"
            && e["value"]
                .as_str()
                .is_some_and(|v| v.starts_with("ghcr.io/strait-mesh/waypoint:"))),
        "{env:?}"
    );
    let args = strings(&c["args"]);
    assert_eq!(flag(&args, "--gateway-class"), Some("istio-waypoint"));
    assert_eq!(flag(&args, "--ca-secret"), Some("strait-ca"));
}

/// `(apiGroup, resource, verb)` granted by a ClusterRole.
fn grants(role: &Value) -> BTreeSet<(String, String, String)> {
    let mut out = BTreeSet::new();
    for rule in role["rules"].as_array().expect("rules") {
        for g in strings(&rule["apiGroups"]) {
            for r in strings(&rule["resources"]) {
                for v in strings(&rule["verbs"]) {
                    out.insert((g.to_owned(), r.to_owned(), v.to_owned()));
                }
            }
        }
    }
    out
}

#[test]
fn rbac_is_least_privilege() {
    let docs = deploy_docs();
    for role in docs.iter().filter(|d| d.kind() == "ClusterRole") {
        for (g, r, v) in grants(&role.value) {
            assert!(
                g != "*" && r != "*" && v != "*",
                "{}: wildcard grant {g}/{r}/{v}",
                role.name()
            );
            if role.name() == "strait-waypoint-secrets" {
                // Reading Secrets, and only that; bound per namespace (checked below).
                assert_eq!((g.as_str(), r.as_str()), ("", "secrets"));
                assert!(matches!(v.as_str(), "get" | "list" | "watch"), "{v}");
                continue;
            }
            assert!(
                !matches!(
                    r.as_str(),
                    "secrets" | "clusterroles" | "clusterrolebindings" | "roles" | "rolebindings"
                ),
                "{}: must not touch {r}",
                role.name()
            );
            assert!(
                !matches!(v.as_str(), "bind" | "escalate" | "impersonate"),
                "{}: {v}",
                role.name()
            );
        }
    }

    let reader = &find(&docs, "ClusterRole", "strait-mesh-reader").value;
    let read_only: BTreeSet<&str> = ["get", "list", "watch"].into();
    let resources: BTreeSet<(String, String)> = grants(reader)
        .into_iter()
        .map(|(g, r, v)| {
            assert!(read_only.contains(v.as_str()), "reader may {v} {g}/{r}");
            (g, r)
        })
        .collect();
    let expected: BTreeSet<(String, String)> = [
        ("", "namespaces"),
        ("", "services"),
        ("", "pods"),
        ("", "configmaps"),
        ("networking.istio.io", "serviceentries"),
        ("networking.istio.io", "destinationrules"),
        ("networking.istio.io", "virtualservices"),
        ("security.istio.io", "authorizationpolicies"),
        ("gateway.networking.k8s.io", "gateways"),
        ("gateway.networking.k8s.io", "httproutes"),
        ("istio.alibabacloud.com", "asmegresstrafficpolicies"),
    ]
    .iter()
    .map(|(g, r)| ((*g).to_owned(), (*r).to_owned()))
    .collect();
    assert_eq!(resources, expected);
    // ConfigMaps: only mesh-config's `istio`.
    let cm = reader["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .find(|r| strings(&r["resources"]).contains(&"configmaps"))
        .expect("configmaps rule");
    assert_eq!(strings(&cm["resourceNames"]), ["istio"]);

    // The data plane's accounts are bound to the reader and nothing else; the controller's to
    // its own role.
    let mut bound = BTreeSet::new();
    for d in docs.iter().filter(|d| d.kind() == "ClusterRoleBinding") {
        let role = d.value["roleRef"]["name"].as_str().unwrap_or_default();
        for s in d.value["subjects"].as_array().into_iter().flatten() {
            let subject = format!(
                "{}:{}:{}",
                s["kind"].as_str().unwrap_or_default(),
                s["namespace"].as_str().unwrap_or_default(),
                s["name"].as_str().unwrap_or_default()
            );
            bound.insert((subject, role.to_owned()));
        }
    }
    let expected_bindings: BTreeSet<(String, String)> = [
        ("ServiceAccount:strait-system:ztunnel", "strait-mesh-reader"),
        (
            "Group::system:serviceaccounts:istio-egress",
            "strait-mesh-reader",
        ),
        (
            "ServiceAccount:strait-system:waypoint-controller",
            "strait-waypoint-controller",
        ),
    ]
    .iter()
    .map(|(s, r)| ((*s).to_owned(), (*r).to_owned()))
    .collect();
    assert_eq!(bound, expected_bindings);
    // The Secret reader is never bound cluster-wide (the set above has no such binding) and
    // is documented with its per-namespace RoleBinding.
    let readme = std::fs::read_to_string(repo_root().join("deploy/README.md")).expect("README");
    assert!(
        readme.contains(
            "create rolebinding strait-waypoint-secrets --clusterrole=strait-waypoint-secrets"
        ),
        "deploy/README.md must show the RoleBinding for strait-waypoint-secrets"
    );

    let controller = grants(&find(&docs, "ClusterRole", "strait-waypoint-controller").value);
    let has = |g: &str, r: &str, v: &str| controller.contains(&(g.into(), r.into(), v.into()));
    assert!(has("gateway.networking.k8s.io", "gateways/status", "patch"));
    // It marks its GatewayClass Accepted: reads classes, patches only their status.
    assert!(has("gateway.networking.k8s.io", "gatewayclasses", "watch"));
    assert!(has(
        "gateway.networking.k8s.io",
        "gatewayclasses/status",
        "patch"
    ));
    assert!(!has("gateway.networking.k8s.io", "gatewayclasses", "patch"));
    // Every write is a server-side apply (patch) or a delete.
    assert!(!controller.iter().any(|(_, _, v)| v == "update"));
    assert!(!has("gateway.networking.k8s.io", "gateways", "update"));
    assert!(!has("gateway.networking.k8s.io", "gateways", "delete"));
    for r in ["deployments", "services", "serviceaccounts"] {
        assert!(
            controller
                .iter()
                .any(|(_, res, v)| res == r && v == "create"),
            "controller cannot create {r}"
        );
    }
}

/// Flags of `bin --help`.
fn help_flags(bin: &str) -> Option<BTreeSet<String>> {
    let path = match mesh_tests::workspace_bin(bin) {
        Ok(p) => p,
        Err(e) => {
            skip_or_fail(&format!("needs the built binary ({e:#})"));
            return None;
        }
    };
    let out = Command::new(path)
        .arg("--help")
        .output()
        .expect("run --help");
    assert!(out.status.success(), "{bin} --help failed");
    let text = String::from_utf8_lossy(&out.stdout);
    Some(
        text.split(|c: char| c.is_whitespace() || c == ',' || c == '=' || c == '[' || c == ']')
            .filter(|w| w.starts_with("--") && w.len() > 2)
            .map(str::to_owned)
            .collect(),
    )
}

fn assert_flags_exist(kind: &str, name: &str, bin: &str) {
    let docs = deploy_docs();
    let args = strings(&pod_spec(&docs, kind, name)["containers"][0]["args"]);
    let Some(known) = help_flags(bin) else {
        return;
    };
    for a in args.iter().filter(|a| a.starts_with("--")) {
        assert!(
            known.contains(*a),
            "{bin} has no flag {a} (deploy/strait.yaml passes it): {known:?}"
        );
    }
}

#[test]
fn ztunnel_knows_every_flag_the_daemonset_passes() {
    assert_flags_exist("DaemonSet", "ztunnel", "ztunnel");
}

#[test]
fn the_controller_knows_every_flag_its_deployment_passes() {
    assert_flags_exist("Deployment", "waypoint-controller", "waypoint-controller");
}
