//! Reading YAML into typed objects: every `*.yaml`/`*.yml` under the config root, recursively,
//! multi-document. A YAML syntax error spoils only its own document: the next `---` starts over. Structural problems (unknown fields, wrong types, unsupported apiVersions,
//! duplicates) are collected for the whole load, not just the first one.
//!
//! Namespace of objects without `metadata.namespace`: the first path component when the file
//! sits in a subdirectory of the root (`root/istio-egress/se.yaml` → `istio-egress`, like
//! `kubectl apply -n istio-egress`), else `default`. Hidden entries (names starting with `.`)
//! are skipped, which also skips the `..data` / `..2024_…` links of a mounted ConfigMap.
use crate::error::{ConfigError, SourceRef};
use crate::model::{asm, core, gateway, meta::Resource, networking, security};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_path_to_error::Segment;
use serde_yaml_ng::Value;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use tracing::{debug, warn};

/// The kinds we understand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
pub enum Kind {
    Namespace,
    Service,
    Pod,
    ConfigMap,
    Secret,
    ServiceEntry,
    DestinationRule,
    VirtualService,
    AuthorizationPolicy,
    Gateway,
    HttpRoute,
    AsmEgressTrafficPolicy,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Namespace => "Namespace",
            Kind::Service => "Service",
            Kind::Pod => "Pod",
            Kind::ConfigMap => "ConfigMap",
            Kind::Secret => "Secret",
            Kind::ServiceEntry => "ServiceEntry",
            Kind::DestinationRule => "DestinationRule",
            Kind::VirtualService => "VirtualService",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
            Kind::Gateway => "Gateway",
            Kind::HttpRoute => "HTTPRoute",
            Kind::AsmEgressTrafficPolicy => "ASMEgressTrafficPolicy",
        }
    }

    fn cluster_scoped(self) -> bool {
        matches!(self, Kind::Namespace)
    }

    /// Classifies `(apiVersion, kind)`: `Ok(None)` for kinds we skip, `Err` for a known kind
    /// written with an apiVersion we do not accept.
    fn classify(api_version: &str, kind: &str) -> Result<Option<Kind>, String> {
        let (group, version) = match api_version.rsplit_once('/') {
            Some((g, v)) => (g, v),
            None => ("", api_version),
        };
        let (k, versions): (Kind, &[&str]) = match (group, kind) {
            ("", "Namespace") => (Kind::Namespace, &["v1"]),
            ("", "Service") => (Kind::Service, &["v1"]),
            ("", "Pod") => (Kind::Pod, &["v1"]),
            ("", "ConfigMap") => (Kind::ConfigMap, &["v1"]),
            ("", "Secret") => (Kind::Secret, &["v1"]),
            ("networking.istio.io", "ServiceEntry") => {
                (Kind::ServiceEntry, &["v1", "v1beta1", "v1alpha3"])
            }
            ("networking.istio.io", "DestinationRule") => {
                (Kind::DestinationRule, &["v1", "v1beta1", "v1alpha3"])
            }
            ("networking.istio.io", "VirtualService") => {
                (Kind::VirtualService, &["v1", "v1beta1", "v1alpha3"])
            }
            ("security.istio.io", "AuthorizationPolicy") => {
                (Kind::AuthorizationPolicy, &["v1", "v1beta1"])
            }
            ("gateway.networking.k8s.io", "Gateway") => (Kind::Gateway, &["v1", "v1beta1"]),
            ("gateway.networking.k8s.io", "HTTPRoute") => (Kind::HttpRoute, &["v1", "v1beta1"]),
            ("istio.alibabacloud.com", "ASMEgressTrafficPolicy") => {
                (Kind::AsmEgressTrafficPolicy, &["v1beta1"])
            }
            _ => return Ok(None),
        };
        if versions.contains(&version) {
            Ok(Some(k))
        } else {
            let g = if group.is_empty() {
                String::new()
            } else {
                format!("{group}/")
            };
            Err(format!(
                "apiVersion {api_version:?} is not supported for {kind} (use one of: {})",
                versions
                    .iter()
                    .map(|v| format!("{g}{v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        }
    }
}

/// A typed object and where it came from.
#[derive(Debug, Clone)]
pub struct Object<T> {
    pub source: SourceRef,
    /// Empty for cluster-scoped kinds.
    pub namespace: String,
    pub name: String,
    pub value: T,
}

impl<T> Object<T> {
    /// `namespace/name` (or `name` when cluster-scoped), as printed in errors.
    pub fn display_name(&self) -> String {
        if self.namespace.is_empty() {
            self.name.clone()
        } else {
            format!("{}/{}", self.namespace, self.name)
        }
    }
}

pub type ServiceEntry = Resource<networking::ServiceEntrySpec>;
pub type DestinationRule = Resource<networking::DestinationRuleSpec>;
pub type VirtualService = Resource<networking::VirtualServiceSpec>;
pub type AuthorizationPolicy = Resource<security::AuthorizationPolicySpec>;
pub type Gateway = Resource<gateway::GatewaySpec, gateway::GatewayStatus>;
pub type HttpRoute = Resource<gateway::HttpRouteSpec>;
pub type AsmEgressTrafficPolicy = Resource<asm::AsmEgressTrafficPolicySpec>;

/// Everything read from one configuration source, per kind, in load order.
#[derive(Debug, Clone, Default)]
pub struct Resources {
    pub namespaces: Vec<Object<core::Namespace>>,
    pub services: Vec<Object<core::Service>>,
    pub pods: Vec<Object<core::Pod>>,
    pub config_maps: Vec<Object<core::ConfigMap>>,
    /// Only TLS material is read from them (DestinationRule `credentialName`).
    pub secrets: Vec<Object<core::Secret>>,
    pub service_entries: Vec<Object<ServiceEntry>>,
    pub destination_rules: Vec<Object<DestinationRule>>,
    pub virtual_services: Vec<Object<VirtualService>>,
    pub authorization_policies: Vec<Object<AuthorizationPolicy>>,
    pub gateways: Vec<Object<Gateway>>,
    pub http_routes: Vec<Object<HttpRoute>>,
    pub egress_policies: Vec<Object<AsmEgressTrafficPolicy>>,
}

/// Result of reading: the objects that parsed, and every error found.
#[derive(Debug, Default)]
pub struct Loaded {
    pub resources: Resources,
    pub errors: Vec<ConfigError>,
}

/// One YAML text to load: `name` is the file path relative to the config root (`/`-separated),
/// which also decides the default namespace.
#[derive(Debug, Clone)]
pub struct SourceFile<'a> {
    pub name: &'a str,
    pub text: &'a str,
}

/// Reads every `*.yaml` / `*.yml` under `root`, recursively, in sorted order.
pub fn read_dir(root: &Path) -> Loaded {
    let mut loaded = Loaded::default();
    let mut files = Vec::new();
    if let Err(e) = collect_files(root, root, &mut files) {
        loaded
            .errors
            .push(ConfigError::file(root.display().to_string(), e));
        return loaded;
    }
    files.sort();
    let mut texts = Vec::with_capacity(files.len());
    for (rel, path) in files {
        match std::fs::read(&path) {
            Ok(bytes) => match String::from_utf8(bytes) {
                Ok(text) => texts.push((rel, text)),
                Err(_) => loaded
                    .errors
                    .push(ConfigError::file(rel, "file is not valid UTF-8")),
            },
            Err(e) => loaded
                .errors
                .push(ConfigError::file(rel, format!("cannot read: {e}"))),
        }
    }
    read_texts(
        texts.iter().map(|(n, t)| (n.as_str(), t.as_str())),
        &mut loaded,
    );
    loaded
}

/// Reads in-memory YAML texts (the embedded default config, tests).
pub fn read_sources<'a>(sources: impl IntoIterator<Item = SourceFile<'a>>) -> Loaded {
    let mut loaded = Loaded::default();
    read_texts(sources.into_iter().map(|s| (s.name, s.text)), &mut loaded);
    loaded
}

/// One document-sized piece of a file.
struct Chunk<'a> {
    file: usize,
    start_line: usize,
    text: &'a str,
}

/// Chunks parsed per batch: bounds the memory held by parsed-but-not-typed documents.
const BATCH: usize = 4096;

/// Parsing YAML (libyaml's scanner) is most of the load time, and documents are independent,
/// so files are split into documents and parsed on a few threads; objects are then added in
/// file / document order, so results and errors do not depend on the thread count.
fn read_texts<'a>(files: impl Iterator<Item = (&'a str, &'a str)>, loaded: &mut Loaded) {
    let files: Vec<(&str, &str)> = files.collect();
    let mut chunks = Vec::new();
    for (i, (_, text)) in files.iter().enumerate() {
        for (start_line, text) in split_documents(text) {
            chunks.push(Chunk {
                file: i,
                start_line,
                text,
            });
        }
    }
    let threads = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4);
    let mut seen = Seen::default();
    let mut doc_index = vec![0usize; files.len()];
    let file_arcs: Vec<Arc<str>> = files.iter().map(|(n, _)| Arc::from(*n)).collect();
    for batch in chunks.chunks(BATCH) {
        let parsed = parse_chunks(batch, &files, threads);
        for (chunk, docs) in batch.iter().zip(parsed) {
            for doc in docs {
                doc_index[chunk.file] += 1;
                let source = SourceRef {
                    file: file_arcs[chunk.file].clone(),
                    document: doc_index[chunk.file],
                };
                match doc {
                    Ok(staged) => {
                        for st in staged {
                            seen.commit(st, &source, loaded);
                        }
                    }
                    // Later documents of the file are still read: they start at their own marker.
                    Err(message) => push_err(loaded, &source, None, None, "", message),
                }
            }
        }
    }
}

/// One document's outcome: its objects and object-level errors, or a YAML syntax error.
type DocResult = Result<Vec<Staged>, String>;

fn parse_chunks(
    batch: &[Chunk<'_>],
    files: &[(&str, &str)],
    threads: usize,
) -> Vec<Vec<DocResult>> {
    let run = |c: &Chunk<'_>| {
        let dir_ns = files[c.file].0.split_once('/').map(|(first, _)| first);
        parse_chunk(c, files[c.file].0, dir_ns)
    };
    // Threads only pay off for large inputs.
    let threads = if batch.len() < 64 { 1 } else { threads };
    if threads == 1 {
        return batch.iter().map(run).collect();
    }
    let per = batch.len().div_ceil(threads);
    std::thread::scope(|scope| {
        let handles: Vec<_> = batch
            .chunks(per)
            .map(|part| scope.spawn(move || part.iter().map(run).collect::<Vec<_>>()))
            .collect();
        handles
            .into_iter()
            .zip(batch.chunks(per))
            .flat_map(|(h, part)| {
                // A panic in the YAML parser must not take the process down with it.
                h.join().unwrap_or_else(|_| {
                    part.iter()
                        .map(|_| vec![Err("internal error while parsing YAML".to_owned())])
                        .collect()
                })
            })
            .collect()
    })
}

/// Parses the documents of one chunk; stops at a syntax error (the stream cannot be
/// resynchronised, and the iterator would repeat the error forever). Line numbers in errors are
/// made absolute (relative to the file).
fn parse_chunk(chunk: &Chunk<'_>, file: &str, dir_ns: Option<&str>) -> Vec<DocResult> {
    let mut out = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(chunk.text) {
        match Value::deserialize(doc) {
            Ok(v) => {
                let mut staged = Vec::new();
                stage_value(v, file, dir_ns, "", &mut staged);
                out.push(Ok(staged));
            }
            Err(e) => {
                let msg = e.to_string();
                let offset = chunk.start_line - 1;
                let msg = LINE_RE.replace_all(&msg, |c: &regex::Captures<'_>| {
                    let n: usize = c[1].parse().unwrap_or(0);
                    format!("line {}", n + offset)
                });
                out.push(Err(format!("invalid YAML: {msg}")));
                break;
            }
        }
    }
    out
}

static LINE_RE: std::sync::LazyLock<regex::Regex> =
    std::sync::LazyLock::new(|| regex::Regex::new(r"line (\d+)").expect("static regex"));

/// Splits a YAML stream at document markers (`---` at column 0), returning each piece with its
/// first line number. YAML forbids `---` at column 0 inside content, so every such line starts
/// a document; directive lines (`%YAML`) stay with the document they introduce.
fn split_documents(text: &str) -> Vec<(usize, &str)> {
    let mut out = Vec::new();
    let (mut start, mut start_line, mut pos, mut line) = (0usize, 1usize, 0usize, 1usize);
    let (mut has_directive, mut has_content) = (false, false);
    // Text before the first marker that holds only comments / blank lines is no document
    // (libyaml would report it as an empty one).
    fn push<'t>(
        out: &mut Vec<(usize, &'t str)>,
        start_line: usize,
        chunk: &'t str,
        has_directive: bool,
        has_content: bool,
    ) {
        if has_directive || has_content {
            out.push((start_line, chunk));
        }
    }
    for l in text.split_inclusive('\n') {
        let is_marker =
            l.starts_with("---") && l[3..].chars().next().is_none_or(char::is_whitespace);
        // A directive-only piece belongs to the document its marker opens.
        if is_marker && pos != start && (has_content || !has_directive) {
            push(
                &mut out,
                start_line,
                &text[start..pos],
                has_directive,
                has_content,
            );
            start = pos;
            start_line = line;
            has_directive = false;
            has_content = false;
        }
        let body = if is_marker { &l[3..] } else { l };
        let t = body.trim();
        if l.starts_with('%') {
            has_directive = true;
        } else if is_marker || (!t.is_empty() && !t.starts_with('#')) {
            // A bare marker opens a (possibly empty) document.
            has_content = true;
        }
        pos += l.len();
        line += 1;
    }
    push(
        &mut out,
        start_line,
        &text[start..],
        has_directive,
        has_content,
    );
    out
}

fn collect_files(root: &Path, dir: &Path, out: &mut Vec<(String, PathBuf)>) -> Result<(), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("cannot read directory: {e}"))?;
    for entry in entries {
        let entry = entry.map_err(|e| format!("cannot read directory: {e}"))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.starts_with('.') {
            continue;
        }
        let path = entry.path();
        // metadata() follows symlinks: mounted ConfigMaps are symlinks to files.
        let Ok(md) = std::fs::metadata(&path) else {
            continue;
        };
        if md.is_dir() {
            collect_files(root, &path, out)?;
        } else if md.is_file() && (name.ends_with(".yaml") || name.ends_with(".yml")) {
            let rel = path.strip_prefix(root).unwrap_or(&path);
            let rel = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join("/");
            out.push((rel, path));
        }
    }
    Ok(())
}

/// The `metadata` fields we need before typed parsing, for error messages.
#[derive(Deserialize, Default, Clone)]
struct PeekMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
}

/// A parsed object (or an object-level error) not yet placed: document numbers and duplicate
/// checks are assigned in file order by [`Seen::commit`].
enum Staged {
    Object {
        kind: Kind,
        namespace: String,
        name: String,
        display: String,
        value: Box<Typed>,
    },
    Error {
        kind: Option<String>,
        object: Option<String>,
        path: String,
        message: String,
    },
}

// Always boxed inside `Staged`, so the variants' sizes do not matter.
#[allow(clippy::large_enum_variant)]
enum Typed {
    Namespace(core::Namespace),
    Service(core::Service),
    Pod(core::Pod),
    ConfigMap(core::ConfigMap),
    Secret(core::Secret),
    ServiceEntry(ServiceEntry),
    DestinationRule(DestinationRule),
    VirtualService(VirtualService),
    AuthorizationPolicy(AuthorizationPolicy),
    Gateway(Gateway),
    HttpRoute(HttpRoute),
    AsmEgressTrafficPolicy(AsmEgressTrafficPolicy),
}

fn stage_err(
    out: &mut Vec<Staged>,
    kind: Option<String>,
    object: Option<String>,
    path: &str,
    message: String,
) {
    out.push(Staged::Error {
        kind,
        object,
        path: path.to_owned(),
        message,
    });
}

fn stage_value(
    mut value: Value,
    file: &str,
    dir_ns: Option<&str>,
    prefix: &str,
    out: &mut Vec<Staged>,
) {
    if value.is_null() {
        return; // empty document (`---` at the end of a file)
    }
    let join = |p: &str| {
        if prefix.is_empty() {
            p.to_owned()
        } else {
            format!("{prefix}.{p}")
        }
    };
    if let Err(e) = value.apply_merge() {
        stage_err(
            out,
            None,
            None,
            prefix,
            format!("invalid YAML merge key: {e}"),
        );
        return;
    }
    let Some(map) = value.as_mapping() else {
        stage_err(
            out,
            None,
            None,
            prefix,
            "document is not a mapping (expected a Kubernetes object)".into(),
        );
        return;
    };
    let api_version = map
        .get("apiVersion")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let kind_str = map
        .get("kind")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    if kind_str == "List" && api_version == "v1" {
        let items = map
            .get("items")
            .and_then(Value::as_sequence)
            .cloned()
            .unwrap_or_default();
        for (j, item) in items.into_iter().enumerate() {
            stage_value(item, file, dir_ns, &join(&format!("items[{j}]")), out);
        }
        return;
    }
    let meta: PeekMeta = map
        .get("metadata")
        .and_then(|m| PeekMeta::deserialize(m.clone()).ok())
        .unwrap_or_default();
    stage_object(
        &api_version,
        &kind_str,
        meta,
        value,
        file,
        dir_ns,
        prefix,
        out,
    );
}

/// Classifies, names and parses one object.
#[allow(clippy::too_many_arguments)]
fn stage_object(
    api_version: &str,
    kind_str: &str,
    peek: PeekMeta,
    body: Value,
    file: &str,
    dir_ns: Option<&str>,
    prefix: &str,
    out: &mut Vec<Staged>,
) {
    let join = |p: &str| {
        if prefix.is_empty() {
            p.to_owned()
        } else {
            format!("{prefix}.{p}")
        }
    };
    if kind_str.is_empty() {
        stage_err(out, None, None, &join("kind"), "required".into());
        return;
    }
    if api_version.is_empty() {
        stage_err(
            out,
            Some(kind_str.to_owned()),
            None,
            &join("apiVersion"),
            "required".into(),
        );
        return;
    }
    let kind = match Kind::classify(api_version, kind_str) {
        Ok(Some(k)) => k,
        Ok(None) => {
            let group = api_version.rsplit_once('/').map(|(g, _)| g).unwrap_or("");
            if group.ends_with("istio.io") || group == "gateway.networking.k8s.io" {
                // Mesh config we do not implement changes behaviour: say so loudly.
                warn!(file, kind = %kind_str, api_version, name = ?peek.name, "unsupported mesh kind skipped");
            } else {
                debug!(file, kind = %kind_str, api_version, "kind not used by the mesh, skipped");
            }
            return;
        }
        Err(msg) => {
            stage_err(
                out,
                Some(kind_str.to_owned()),
                peek.name.clone(),
                &join("apiVersion"),
                msg,
            );
            return;
        }
    };
    let namespace = if kind.cluster_scoped() {
        String::new()
    } else {
        peek.namespace
            .clone()
            .filter(|n| !n.is_empty())
            .or_else(|| dir_ns.map(str::to_owned))
            .unwrap_or_else(|| "default".to_owned())
    };
    let Some(name) = peek.name.clone().filter(|n| !n.is_empty()) else {
        stage_err(
            out,
            Some(kind.as_str().into()),
            None,
            &join("metadata.name"),
            "required".into(),
        );
        return;
    };
    let display = if namespace.is_empty() {
        name.clone()
    } else {
        format!("{namespace}/{name}")
    };
    if !is_dns_label_or_subdomain(&name) {
        stage_err(
            out,
            Some(kind.as_str().into()),
            Some(display.clone()),
            &join("metadata.name"),
            format!("{name:?} is not a valid Kubernetes name (lowercase RFC 1123 subdomain)"),
        );
    }

    macro_rules! typed {
        ($ty:ty, $variant:ident) => {{
            match parse_all::<$ty>(body) {
                Ok(v) => out.push(Staged::Object {
                    kind,
                    namespace,
                    name,
                    display,
                    value: Box::new(Typed::$variant(v)),
                }),
                Err(errors) => {
                    for (path, msg) in errors {
                        let path = if path == "." { String::new() } else { path };
                        let full = match (prefix.is_empty(), path.is_empty()) {
                            (true, _) => path,
                            (false, true) => prefix.to_owned(),
                            (false, false) => format!("{prefix}.{path}"),
                        };
                        stage_err(
                            out,
                            Some(kind.as_str().into()),
                            Some(display.clone()),
                            &full,
                            msg,
                        );
                    }
                }
            }
        }};
    }
    match kind {
        Kind::Namespace => typed!(core::Namespace, Namespace),
        Kind::Service => typed!(core::Service, Service),
        Kind::Pod => typed!(core::Pod, Pod),
        Kind::ConfigMap => typed!(core::ConfigMap, ConfigMap),
        Kind::Secret => typed!(core::Secret, Secret),
        Kind::ServiceEntry => typed!(ServiceEntry, ServiceEntry),
        Kind::DestinationRule => typed!(DestinationRule, DestinationRule),
        Kind::VirtualService => typed!(VirtualService, VirtualService),
        Kind::AuthorizationPolicy => typed!(AuthorizationPolicy, AuthorizationPolicy),
        Kind::Gateway => typed!(Gateway, Gateway),
        Kind::HttpRoute => typed!(HttpRoute, HttpRoute),
        Kind::AsmEgressTrafficPolicy => typed!(AsmEgressTrafficPolicy, AsmEgressTrafficPolicy),
    }
}

/// First definition of every (kind, namespace, name), for duplicate errors naming both places.
#[derive(Default)]
struct Seen(HashMap<(Kind, String, String), SourceRef>);

impl Seen {
    fn commit(&mut self, st: Staged, source: &SourceRef, loaded: &mut Loaded) {
        let (kind, namespace, name, display, value) = match st {
            Staged::Error {
                kind,
                object,
                path,
                message,
            } => {
                push_err(loaded, source, kind, object, &path, message);
                return;
            }
            Staged::Object {
                kind,
                namespace,
                name,
                display,
                value,
            } => (kind, namespace, name, display, value),
        };
        let key = (kind, namespace, name);
        if let Some(first) = self.0.get(&key) {
            let message = format!(
                "duplicate {} {display}: already defined at {first}",
                kind.as_str()
            );
            push_err(
                loaded,
                source,
                Some(kind.as_str().into()),
                Some(display),
                "",
                message,
            );
            return;
        }
        self.0.insert(key.clone(), source.clone());
        let (_, namespace, name) = key;
        let source = source.clone();
        let r = &mut loaded.resources;
        macro_rules! put {
            ($vec:ident, $v:expr) => {
                r.$vec.push(Object {
                    source,
                    namespace,
                    name,
                    value: $v,
                })
            };
        }
        match *value {
            Typed::Namespace(v) => put!(namespaces, v),
            Typed::Service(v) => put!(services, v),
            Typed::Pod(v) => put!(pods, v),
            Typed::ConfigMap(v) => put!(config_maps, v),
            Typed::Secret(v) => put!(secrets, v),
            Typed::ServiceEntry(v) => put!(service_entries, v),
            Typed::DestinationRule(v) => put!(destination_rules, v),
            Typed::VirtualService(v) => put!(virtual_services, v),
            Typed::AuthorizationPolicy(v) => put!(authorization_policies, v),
            Typed::Gateway(v) => put!(gateways, v),
            Typed::HttpRoute(v) => put!(http_routes, v),
            Typed::AsmEgressTrafficPolicy(v) => put!(egress_policies, v),
        }
    }
}

/// Bounds the errors [`parse_all`] collects: plenty for real typos, and a pathological document
/// cannot keep the loader busy.
const MAX_ERRORS_PER_DOCUMENT: usize = 32;

/// Deserializes one object strictly, returning every structural error as `(path, message)` in
/// document order rather than only the first. Serde stops at the first error, so after each one
/// the offending node (the unknown key, or the badly typed field) is removed from the tree and
/// deserialization is retried. A removed field the type requires (`number: eighty`) is put back
/// as a neutral placeholder (`0`, `""`, `false`, `[]`, `{}`, first that fits); errors at paths we
/// edited are ours, never reported. It stops when the rest parses, at
/// [`MAX_ERRORS_PER_DOCUMENT`], or at an error it cannot step over: a missing required field, a
/// whole sequence element (removing it would shift the indices reported for later elements), or
/// a path that does not resolve in the tree.
fn parse_all<T: DeserializeOwned>(mut value: Value) -> Result<T, Vec<(String, String)>> {
    let placeholders = || {
        [
            Value::from(0),
            Value::from(""),
            Value::Bool(false),
            Value::Sequence(Vec::new()),
            Value::Mapping(serde_yaml_ng::Mapping::new()),
        ]
    };
    let mut errors: Vec<(String, String)> = Vec::new();
    // Paths we removed, with the next placeholder to try there. Terminates: every turn either
    // records an error at a new path (at most MAX_ERRORS_PER_DOCUMENT) or uses up a placeholder.
    let mut edited: Vec<(String, usize)> = Vec::new();
    loop {
        let err = match serde_path_to_error::deserialize::<_, T>(&value) {
            Ok(v) if errors.is_empty() => return Ok(v),
            Ok(_) => return Err(errors),
            Err(e) => e,
        };
        let mut segments: Vec<Segment> = err.path().iter().cloned().collect();
        let mut path = err.path().to_string();
        let message = err.into_inner().to_string();
        let missing = message
            .strip_prefix("missing field `")
            .and_then(|m| m.split_once('`'))
            .map(|(field, _)| field.to_owned());
        if let Some(field) = &missing {
            let full = if path == "." {
                field.clone()
            } else {
                format!("{path}.{field}")
            };
            if edited.iter().any(|(p, _)| *p == full) {
                segments.push(Segment::Map { key: field.clone() });
                path = full;
            }
        }
        if let Some((_, next)) = edited.iter_mut().find(|(p, _)| *p == path) {
            let Some(v) = placeholders().into_iter().nth(*next) else {
                return Err(errors);
            };
            *next += 1;
            if !set_node(&mut value, &segments, Some(v)) {
                return Err(errors);
            }
            continue;
        }
        errors.push((path.clone(), message));
        if missing.is_some()
            || errors.len() >= MAX_ERRORS_PER_DOCUMENT
            || !set_node(&mut value, &segments, None)
        {
            return Err(errors);
        }
        edited.push((path, 0));
    }
}

/// Sets (`Some`) or removes (`None`, keeping the order of the other keys) the mapping entry at
/// `path`; `false` when the path does not end in a mapping key or does not resolve.
fn set_node(value: &mut Value, path: &[Segment], new: Option<Value>) -> bool {
    let Some((Segment::Map { key }, parents)) = path.split_last() else {
        return false;
    };
    let mut node = value;
    for seg in parents {
        let next = match seg {
            Segment::Map { key } => node.get_mut(key.as_str()),
            Segment::Seq { index } => node.get_mut(*index),
            Segment::Enum { .. } | Segment::Unknown => None,
        };
        let Some(next) = next else { return false };
        node = next;
    }
    let Some(map) = node.as_mapping_mut() else {
        return false;
    };
    match new {
        Some(v) => {
            map.insert(Value::from(key.as_str()), v);
            true
        }
        None => map.shift_remove(key.as_str()).is_some(),
    }
}

fn push_err(
    loaded: &mut Loaded,
    source: &SourceRef,
    kind: Option<String>,
    object: Option<String>,
    path: &str,
    message: String,
) {
    loaded.errors.push(ConfigError {
        file: source.file.to_string(),
        document: Some(source.document),
        kind,
        object,
        path: (!path.is_empty()).then(|| path.to_owned()),
        message,
    });
}

/// RFC 1123 subdomain: lowercase alphanumerics, `-` and `.`, ≤ 253 chars, alnum at the ends.
fn is_dns_label_or_subdomain(s: &str) -> bool {
    s.len() <= 253
        && s.split('.').all(|l| {
            !l.is_empty()
                && l.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && !l.starts_with('-')
                && !l.ends_with('-')
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_versions() {
        let cases = [
            (
                "networking.istio.io/v1",
                "ServiceEntry",
                Ok(Some(Kind::ServiceEntry)),
            ),
            (
                "networking.istio.io/v1alpha3",
                "VirtualService",
                Ok(Some(Kind::VirtualService)),
            ),
            (
                "security.istio.io/v1beta1",
                "AuthorizationPolicy",
                Ok(Some(Kind::AuthorizationPolicy)),
            ),
            (
                "gateway.networking.k8s.io/v1beta1",
                "HTTPRoute",
                Ok(Some(Kind::HttpRoute)),
            ),
            (
                "istio.alibabacloud.com/v1beta1",
                "ASMEgressTrafficPolicy",
                Ok(Some(Kind::AsmEgressTrafficPolicy)),
            ),
            ("v1", "Pod", Ok(Some(Kind::Pod))),
            ("apps/v1", "Deployment", Ok(None)),
            ("v1", "ServiceAccount", Ok(None)),
            ("v1", "Secret", Ok(Some(Kind::Secret))),
            ("networking.istio.io/v1", "Gateway", Ok(None)),
        ];
        for (av, k, want) in cases {
            assert_eq!(Kind::classify(av, k), want, "{av} {k}");
        }
        assert!(Kind::classify("security.istio.io/v1alpha1", "AuthorizationPolicy").is_err());
        assert!(Kind::classify("v2", "Service").is_err());
    }

    #[test]
    fn split_table() {
        let cases: &[(&str, &[(usize, &str)])] = &[
            ("a: 1\n", &[(1, "a: 1\n")]),
            (
                "---\na: 1\n---\nb: 2\n",
                &[(1, "---\na: 1\n"), (3, "---\nb: 2\n")],
            ),
            ("# c\n---\na: 1\n", &[(2, "---\na: 1\n")]),
            (
                "%YAML 1.2\n---\na: 1\n---\n",
                &[(1, "%YAML 1.2\n---\na: 1\n"), (4, "---\n")],
            ),
            (
                "k: |\n  ---\n  x\n---a\n",
                &[(1, "k: |\n  ---\n  x\n---a\n")],
            ),
            (
                "--- {a: 1}\n--- {b: 2}",
                &[(1, "--- {a: 1}\n"), (2, "--- {b: 2}")],
            ),
            ("", &[]),
            ("# only a comment\n\n", &[]),
        ];
        for (text, want) in cases {
            assert_eq!(split_documents(text), *want, "{text:?}");
        }
    }

    #[test]
    fn documents_counted_like_the_yaml_stream() {
        // Leading comments make no document; empty documents count; a syntax error spoils only
        // its own document, with file-relative line numbers.
        let text = "# header\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n---\n---\nkind: [\n---\napiVersion: v1\nkind: Namespace\nmetadata: {name: b}\n";
        let l = read_sources([SourceFile {
            name: "f.yaml",
            text,
        }]);
        assert_eq!(
            l.resources
                .namespaces
                .iter()
                .map(|n| (n.name.as_str(), n.source.document))
                .collect::<Vec<_>>(),
            [("a", 1), ("b", 4)]
        );
        assert_eq!(l.errors.len(), 1, "{:?}", l.errors);
        assert_eq!(l.errors[0].document, Some(3));
        assert!(
            l.errors[0].message.contains("line 9"),
            "{}",
            l.errors[0].message
        );
    }

    #[test]
    fn parse_all_stops_where_it_cannot_step_over() {
        #[derive(Debug, Deserialize)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct T {
            a: u32,
            #[serde(default)]
            b: Vec<u32>,
        }
        let run = |y: &str| {
            let v: Value = serde_yaml_ng::from_str(y).expect("test YAML");
            parse_all::<T>(v).unwrap_err()
        };
        let paths = |e: Vec<(String, String)>| e.into_iter().map(|(p, _)| p).collect::<Vec<_>>();
        // A genuinely missing required field is reported, and ends the document.
        let e = run("{x: 1, b: [1]}");
        assert_eq!(paths(e.clone()), ["x", "."]);
        assert!(e[1].1.starts_with("missing field `a`"), "{e:?}");
        // A bad sequence element ends it too (removing it would renumber later elements).
        assert_eq!(paths(run("{b: [x, y], a: 1, z: 2}")), ["b[0]"]);
        // A bad required field is stepped over without a second error for it.
        assert_eq!(paths(run("{a: x, z: 1}")), ["a", "z"]);
    }

    #[test]
    fn names() {
        assert!(is_dns_label_or_subdomain("external-svc-aliyun"));
        assert!(is_dns_label_or_subdomain("a.b-c"));
        assert!(!is_dns_label_or_subdomain("Upper"));
        assert!(!is_dns_label_or_subdomain("-x"));
        assert!(!is_dns_label_or_subdomain("a..b"));
    }
}
