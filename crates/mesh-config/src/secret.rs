//! Kubernetes Secrets as TLS credentials for DestinationRule `tls.credentialName` (Istio's
//! "mutual TLS origination" for egress).
//!
//! Keys are read as Istio reads them: the generic form `cert` / `key` / `cacert`, else the
//! `kubernetes.io/tls` form `tls.crt` / `tls.key` / `ca.crt`. The CA may also come from a
//! separate Secret `<name>-cacert`, which wins when it exists (Istio's SDS lookup of the root
//! resource `<name>-cacert`). `stringData` values win over `data` (the API server merges them
//! that way on write).
//!
//! A waypoint reads the Secret from its own namespace, as Istio gateways do. Resolution
//! ([`resolve_credential`]) is pure: snapshot + waypoint namespace + rule in, PEM material (or
//! why there is none) out. Key material is never serialized or printed: [`Pem`] redacts itself
//! in `Debug` and in the config dump.
use crate::error::ObjErrors;
use crate::model::core;
use crate::policy::{ClientTls, TlsMode};
use crate::snapshot::{NamespacedName, Snapshot};
use base64::Engine as _;
use serde::Serialize;
use std::fmt;
use std::hash::{Hash, Hasher};
use std::sync::Arc;

pub const TLS_CERT: &str = "tls.crt";
pub const TLS_KEY: &str = "tls.key";
pub const TLS_CA: &str = "ca.crt";
pub const GENERIC_CERT: &str = "cert";
pub const GENERIC_KEY: &str = "key";
pub const GENERIC_CA: &str = "cacert";
/// Suffix of Istio's separate CA Secret (`<credentialName>-cacert`).
pub const CA_SECRET_SUFFIX: &str = "-cacert";
const TLS_SECRET_TYPE: &str = "kubernetes.io/tls";

/// PEM bytes read from a Secret. Shown as `<redacted>` in `Debug` and in dumps.
#[derive(Clone, PartialEq, Eq)]
pub struct Pem(Arc<[u8]>);

impl Pem {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Pem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Pem(<redacted, {} bytes>)", self.0.len())
    }
}

impl Serialize for Pem {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("<redacted>")
    }
}

/// The TLS material of one Secret (each part optional: a CA-only Secret is valid).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct SecretTls {
    /// Certificate chain: `cert`, else `tls.crt` (only with its key).
    pub cert_chain: Option<Pem>,
    /// Private key: `key`, else `tls.key`.
    pub key: Option<Pem>,
    /// CA certificates: `cacert`, else `ca.crt`.
    pub ca: Option<Pem>,
    /// Identifies the material for cache keys without hashing it again per lookup.
    #[serde(skip)]
    fingerprint: u64,
}

/// One key of a Secret: `stringData` wins over `data`. `None` when absent or unusable (then
/// an error names the field).
fn field(secret: &core::Secret, key: &str, e: &mut ObjErrors<'_>) -> Option<Pem> {
    let (path, bytes) = if let Some(text) = secret.string_data.get(key) {
        (format!("stringData[{key:?}]"), text.as_bytes().to_vec())
    } else {
        let b64 = secret.data.get(key)?;
        let path = format!("data[{key:?}]");
        // Wrapped base64 (block scalars) is common in hand-written YAML.
        let compact: Vec<u8> = b64.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        match base64::engine::general_purpose::STANDARD.decode(compact) {
            Ok(b) => (path, b),
            Err(err) => {
                // The error's own text quotes the offending byte: keep key material out.
                let why = match err {
                    base64::DecodeError::InvalidByte(at, _) => {
                        format!("invalid character at offset {at}")
                    }
                    base64::DecodeError::InvalidLength(n) => format!("invalid length {n}"),
                    base64::DecodeError::InvalidLastSymbol(at, _) => {
                        format!("invalid last symbol at offset {at}")
                    }
                    base64::DecodeError::InvalidPadding => "invalid padding".to_owned(),
                };
                e.push(path, format!("not valid base64 ({why})"));
                return None;
            }
        }
    };
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        e.push(path, "not PEM (no \"-----BEGIN\" line)");
        return None;
    }
    Some(Pem(bytes.into()))
}

fn has(secret: &core::Secret, key: &str) -> bool {
    secret.data.contains_key(key) || secret.string_data.contains_key(key)
}

/// Decodes the TLS keys of `secret`; every problem is pushed to `e` (path `data["tls.key"]`).
/// Keys that TLS does not use are ignored, so any Secret may sit in the configuration.
pub(crate) fn decode(secret: &core::Secret, e: &mut ObjErrors<'_>) -> SecretTls {
    // Half a pair is reported below; here only a TLS Secret without either key.
    if secret.type_.as_deref() == Some(TLS_SECRET_TYPE)
        && !has(secret, TLS_CERT)
        && !has(secret, TLS_KEY)
    {
        for key in [TLS_CERT, TLS_KEY] {
            e.push(
                format!("data[{key:?}]"),
                format!("required for type {TLS_SECRET_TYPE}"),
            );
        }
    }
    let pair = |cert: &str, key: &str, e: &mut ObjErrors<'_>| {
        let (c, k) = (field(secret, cert, e), field(secret, key, e));
        for (missing, present) in [(key, cert), (cert, key)] {
            if has(secret, present) && !has(secret, missing) {
                e.push(
                    format!("data[{missing:?}]"),
                    format!("missing: {present:?} is set without it (certificate and key come as a pair)"),
                );
            }
        }
        c.zip(k)
    };
    let generic = pair(GENERIC_CERT, GENERIC_KEY, e);
    let tls = pair(TLS_CERT, TLS_KEY, e);
    let ca_generic = field(secret, GENERIC_CA, e);
    let ca_tls = field(secret, TLS_CA, e);
    let (cert_chain, key) = generic.or(tls).unzip();
    let mut out = SecretTls {
        cert_chain,
        key,
        ca: ca_generic.or(ca_tls),
        fingerprint: 0,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    for part in [&out.cert_chain, &out.key, &out.ca] {
        part.as_ref().map(Pem::as_bytes).hash(&mut h);
    }
    out.fingerprint = h.finish();
    out
}

/// What a waypoint presents and trusts for one `credentialName`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsCredential {
    /// The Secret named by `credentialName`, in the waypoint's namespace.
    pub secret: NamespacedName,
    /// MUTUAL: the client certificate chain and its key. Never set for SIMPLE.
    pub client: Option<(Pem, Pem)>,
    /// Roots for the server's certificate; `None` only with `insecureSkipVerify`.
    pub ca: Option<Pem>,
    /// Where `ca` came from: `<name>-cacert` when that Secret exists, else `secret`.
    pub ca_secret: Option<NamespacedName>,
    fingerprint: u64,
}

// Cache keys hash the fingerprint, not kilobytes of PEM, on every request.
impl Hash for TlsCredential {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.fingerprint.hash(state);
    }
}

/// Why a `credentialName` gives no usable credential. The connection must then fail closed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CredentialError {
    #[error("Secret {secret} not found")]
    NotFound { secret: NamespacedName },
    #[error(
        "Secret {secret} has no client certificate and key (tls.crt and tls.key, or cert and key)"
    )]
    NoClientCertificate { secret: NamespacedName },
    #[error(
        "no CA certificate to verify the server: Secret {ca_secret} has no ca.crt or cacert key"
    )]
    NoCa { ca_secret: NamespacedName },
}

/// The credential for `tls.credentialName` as the waypoint in `waypoint_ns` uses it. `None`
/// when the rule names no Secret or originates no TLS (DISABLE, ISTIO_MUTUAL).
///
/// MUTUAL needs the client pair from `<name>`; both modes need a CA (from `<name>-cacert` when
/// that Secret exists, else from `<name>`) unless `insecureSkipVerify`. SIMPLE reads only the
/// CA, as Istio does.
pub fn resolve_credential(
    snap: &Snapshot,
    waypoint_ns: &str,
    tls: &ClientTls,
) -> Option<Result<TlsCredential, CredentialError>> {
    let name = tls.credential_name.as_deref()?;
    if !matches!(tls.mode, TlsMode::Simple | TlsMode::Mutual) {
        return None;
    }
    Some(resolve_named(snap, waypoint_ns, name, tls))
}

fn resolve_named(
    snap: &Snapshot,
    waypoint_ns: &str,
    name: &str,
    tls: &ClientTls,
) -> Result<TlsCredential, CredentialError> {
    let id = NamespacedName::new(waypoint_ns, name);
    let ca_id = NamespacedName::new(waypoint_ns, format!("{name}{CA_SECRET_SUFFIX}"));
    let main = snap.secrets.get(&id);
    let separate_ca = snap.secrets.get(&ca_id);
    let client = match tls.mode {
        TlsMode::Mutual => {
            let s = main.ok_or_else(|| CredentialError::NotFound { secret: id.clone() })?;
            match (&s.cert_chain, &s.key) {
                (Some(c), Some(k)) => Some((c.clone(), k.clone())),
                _ => return Err(CredentialError::NoClientCertificate { secret: id }),
            }
        }
        _ => None,
    };
    let (ca_source, ca_secret) = match (separate_ca, main) {
        (Some(s), _) => (s, ca_id),
        (None, Some(s)) => (s, id.clone()),
        (None, None) => return Err(CredentialError::NotFound { secret: id }),
    };
    if ca_source.ca.is_none() && !tls.insecure_skip_verify {
        return Err(CredentialError::NoCa { ca_secret });
    }
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (
        &id,
        main.map(|s| s.fingerprint),
        &ca_secret,
        ca_source.fingerprint,
    )
        .hash(&mut h);
    Ok(TlsCredential {
        secret: id,
        client,
        ca: ca_source.ca.clone(),
        ca_secret: ca_source.ca.is_some().then_some(ca_secret),
        fingerprint: h.finish(),
    })
}

/// A DestinationRule whose `credentialName` a waypoint cannot use: its connections fail closed.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct CredentialWarning {
    pub rule: NamespacedName,
    /// `spec.trafficPolicy.portLevelSettings[0].tls.credentialName`.
    pub field: String,
    pub waypoint: NamespacedName,
    pub message: String,
}

impl fmt::Display for CredentialWarning {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "DestinationRule {} {} (waypoint {}): {}",
            self.rule, self.field, self.waypoint, self.message
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CERT: &str = "-----BEGIN CERTIFICATE-----\nQ0VSVA==\n-----END CERTIFICATE-----\n";
    const KEY: &str = "-----BEGIN PRIVATE KEY-----\nU0VDUkVUS0VZ\n-----END PRIVATE KEY-----\n";
    const CA: &str = "-----BEGIN CERTIFICATE-----\nQ0E=\n-----END CERTIFICATE-----\n";

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    /// A Secret document; `data` values are base64-encoded here, `string` ones are not.
    fn secret_yaml(ns: &str, name: &str, ty: &str, data: &[(&str, &str)]) -> String {
        let mut y = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: {name}, namespace: {ns}}}\ntype: {ty}\ndata:\n"
        );
        for (k, v) in data {
            y.push_str(&format!("  {k}: {}\n", b64(v)));
        }
        y
    }

    fn decode_yaml(y: &str) -> (SecretTls, Vec<crate::error::ConfigError>) {
        let loaded = crate::load::read_sources([crate::load::SourceFile {
            name: "secrets/s.yaml",
            text: y,
        }]);
        assert!(loaded.errors.is_empty(), "{:?}", loaded.errors);
        let s = &loaded.resources.secrets[0];
        let mut out = Vec::new();
        let mut e = ObjErrors {
            source: &s.source,
            kind: "Secret",
            object: s.display_name(),
            out: &mut out,
        };
        (decode(&s.value, &mut e), out)
    }

    #[test]
    fn decode_table() {
        let tls = |data: &[(&str, &str)]| secret_yaml("ns", "s", "kubernetes.io/tls", data);
        let opaque = |data: &[(&str, &str)]| secret_yaml("ns", "s", "Opaque", data);
        // (Secret, which of cert / key / ca decode, error lines expected)
        let cases: Vec<(String, [bool; 3], Vec<&str>)> = vec![
            (
                tls(&[("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CA)]),
                [true, true, true],
                vec![],
            ),
            // Istio's generic form.
            (
                opaque(&[("cert", CERT), ("key", KEY), ("cacert", CA)]),
                [true, true, true],
                vec![],
            ),
            // CA only: a valid SIMPLE credential.
            (opaque(&[("ca.crt", CA)]), [false, false, true], vec![]),
            // Keys TLS does not read are ignored, whatever they hold.
            (
                opaque(&[("password", "hunter2")]),
                [false, false, false],
                vec![],
            ),
            (
                tls(&[("tls.crt", CERT)]),
                [false, false, false],
                vec![
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["tls.key"]: missing: "tls.crt" is set without it (certificate and key come as a pair)"#,
                ],
            ),
            (
                tls(&[("ca.crt", CA)]),
                [false, false, true],
                vec![
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["tls.crt"]: required for type kubernetes.io/tls"#,
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["tls.key"]: required for type kubernetes.io/tls"#,
                ],
            ),
            (
                opaque(&[("key", KEY), ("ca.crt", "not pem")]),
                [false, false, false],
                vec![
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["cert"]: missing: "key" is set without it (certificate and key come as a pair)"#,
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["ca.crt"]: not PEM (no "-----BEGIN" line)"#,
                ],
            ),
            (
                "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: ns}\ndata:\n  ca.crt: 'not*base64'\n".into(),
                [false, false, false],
                vec![
                    r#"secrets/s.yaml:document 1: Secret ns/s: data["ca.crt"]: not valid base64 (invalid character at offset 3)"#,
                ],
            ),
            // stringData is plain text and wins over data.
            (
                format!(
                    "apiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: ns}}\ndata: {{ca.crt: '!!'}}\nstringData:\n  ca.crt: |\n{}",
                    CA.lines().map(|l| format!("    {l}\n")).collect::<String>()
                ),
                [false, false, true],
                vec![],
            ),
        ];
        for (y, want, errs) in cases {
            let (got, out) = decode_yaml(&y);
            let lines: Vec<String> = out.iter().map(ToString::to_string).collect();
            assert_eq!(lines, errs, "{y}");
            assert_eq!(
                [
                    got.cert_chain.is_some(),
                    got.key.is_some(),
                    got.ca.is_some()
                ],
                want,
                "{y}"
            );
        }
        // Base64 wrapped over lines decodes like the unwrapped form.
        let wrapped = format!(
            "apiVersion: v1\nkind: Secret\nmetadata: {{name: s, namespace: ns}}\ndata:\n  ca.crt: >-\n    {}\n    {}\n",
            &b64(CA)[..20],
            &b64(CA)[20..]
        );
        let (got, out) = decode_yaml(&wrapped);
        assert!(out.is_empty(), "{out:?}");
        assert_eq!(got.ca.as_ref().map(Pem::as_bytes), Some(CA.as_bytes()));
    }

    fn tls(mode: TlsMode, name: &str) -> ClientTls {
        ClientTls {
            mode,
            sni: None,
            ca_certificates: Some("/files/are/ignored.pem".into()),
            client_certificate: None,
            private_key: None,
            credential_name: Some(name.to_owned()),
            credential_path: Some("spec.trafficPolicy.tls.credentialName".into()),
            subject_alt_names: vec![],
            insecure_skip_verify: false,
        }
    }

    #[test]
    fn resolution_table() {
        let sources = [
            secret_yaml(
                "egress",
                "client",
                "kubernetes.io/tls",
                &[("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CA)],
            ),
            secret_yaml(
                "egress",
                "generic",
                "Opaque",
                &[("cert", CERT), ("key", KEY)],
            ),
            secret_yaml("egress", "generic-cacert", "Opaque", &[("cacert", CA)]),
            secret_yaml("egress", "ca-only", "Opaque", &[("ca.crt", CA)]),
            secret_yaml("egress", "no-ca", "Opaque", &[("cert", CERT), ("key", KEY)]),
            secret_yaml("egress", "lone-cacert", "Opaque", &[("ca.crt", CA)]),
            secret_yaml("other", "elsewhere", "Opaque", &[("ca.crt", CA)]),
        ];
        let snap = crate::load_sources(sources.iter().enumerate().map(|(i, s)| {
            (
                [
                    "a.yaml", "b.yaml", "c.yaml", "d.yaml", "e.yaml", "f.yaml", "g.yaml",
                ][i],
                s.as_str(),
            )
        }))
        .expect("valid secrets");
        let nn = |n: &str| NamespacedName::new("egress", n);
        type Want = Result<(bool, Option<NamespacedName>), CredentialError>;
        // (waypoint namespace, mode, credentialName, insecureSkipVerify, client pair?, CA source)
        let cases: Vec<(&str, TlsMode, &str, bool, Want)> = vec![
            (
                "egress",
                TlsMode::Mutual,
                "client",
                false,
                Ok((true, Some(nn("client")))),
            ),
            // SIMPLE reads only the CA, even from a Secret that has a client pair.
            (
                "egress",
                TlsMode::Simple,
                "client",
                false,
                Ok((false, Some(nn("client")))),
            ),
            // The separate <name>-cacert Secret supplies the CA.
            (
                "egress",
                TlsMode::Mutual,
                "generic",
                false,
                Ok((true, Some(nn("generic-cacert")))),
            ),
            (
                "egress",
                TlsMode::Simple,
                "ca-only",
                false,
                Ok((false, Some(nn("ca-only")))),
            ),
            // Only <name>-cacert exists: enough for SIMPLE, not for MUTUAL.
            (
                "egress",
                TlsMode::Simple,
                "lone",
                false,
                Ok((false, Some(nn("lone-cacert")))),
            ),
            (
                "egress",
                TlsMode::Mutual,
                "lone",
                false,
                Err(CredentialError::NotFound { secret: nn("lone") }),
            ),
            (
                "egress",
                TlsMode::Mutual,
                "ca-only",
                false,
                Err(CredentialError::NoClientCertificate {
                    secret: nn("ca-only"),
                }),
            ),
            (
                "egress",
                TlsMode::Mutual,
                "no-ca",
                false,
                Err(CredentialError::NoCa {
                    ca_secret: nn("no-ca"),
                }),
            ),
            ("egress", TlsMode::Mutual, "no-ca", true, Ok((true, None))),
            (
                "egress",
                TlsMode::Mutual,
                "missing",
                false,
                Err(CredentialError::NotFound {
                    secret: nn("missing"),
                }),
            ),
            // The waypoint's namespace, never another one.
            (
                "egress",
                TlsMode::Simple,
                "elsewhere",
                false,
                Err(CredentialError::NotFound {
                    secret: nn("elsewhere"),
                }),
            ),
            (
                "other",
                TlsMode::Simple,
                "elsewhere",
                false,
                Ok((false, Some(NamespacedName::new("other", "elsewhere")))),
            ),
        ];
        for (ns, mode, name, skip, want) in cases {
            let t = ClientTls {
                insecure_skip_verify: skip,
                ..tls(mode, name)
            };
            let got = resolve_credential(&snap, ns, &t)
                .expect("credentialName set")
                .map(|c| {
                    if let Some((cert, key)) = &c.client {
                        assert_eq!(cert.as_bytes(), CERT.as_bytes());
                        assert_eq!(key.as_bytes(), KEY.as_bytes());
                    }
                    if let Some(ca) = &c.ca {
                        assert_eq!(ca.as_bytes(), CA.as_bytes());
                    }
                    assert_eq!(c.secret, NamespacedName::new(ns, name));
                    (c.client.is_some(), c.ca_secret)
                });
            assert_eq!(got, want, "{ns} {mode:?} {name} skip={skip}");
        }
        // No credentialName, or a mode that originates nothing: nothing to resolve.
        let none = ClientTls {
            credential_name: None,
            ..tls(TlsMode::Mutual, "x")
        };
        assert!(resolve_credential(&snap, "egress", &none).is_none());
        assert!(resolve_credential(&snap, "egress", &tls(TlsMode::Disable, "client")).is_none());
    }

    const MESH: &str = r#"
apiVersion: v1
kind: Namespace
metadata: {name: egress, labels: {istio.io/use-waypoint: waypoint}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: waypoint, namespace: egress}
spec:
  gatewayClassName: istio-waypoint
  addresses: [{value: 10.244.1.20}]
  listeners: [{name: mesh, port: 15008, protocol: HBONE}]
---
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: api, namespace: egress}
spec:
  hosts: [api.example]
  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 443}]
  resolution: DNS
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: api, namespace: egress}
spec:
  host: api.example
  trafficPolicy:
    portLevelSettings:
    - port: {number: 80}
      tls: {mode: MUTUAL, credentialName: api-client}
"#;

    #[test]
    fn missing_secret_is_a_warning_naming_rule_field_and_secret() {
        let snap =
            crate::load_sources([("mesh.yaml", MESH)]).expect("a missing Secret is no error");
        let w = snap.credential_warnings();
        assert_eq!(w.len(), 1, "{w:?}");
        assert_eq!(
            w[0].to_string(),
            "DestinationRule egress/api spec.trafficPolicy.portLevelSettings[0].tls.credentialName (waypoint egress/waypoint): Secret egress/api-client not found"
        );
        let tls = snap.upstream_tls("api.example", 80, None).expect("tls");
        assert!(matches!(
            snap.tls_credential("egress", tls),
            Some(Err(CredentialError::NotFound { .. }))
        ));
        // With the Secret the warning is gone and the rule resolves.
        let secret = secret_yaml(
            "egress",
            "api-client",
            "kubernetes.io/tls",
            &[("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CA)],
        );
        let snap = crate::load_sources([("mesh.yaml", MESH), ("secret.yaml", secret.as_str())])
            .expect("valid");
        assert!(snap.credential_warnings().is_empty());
        let tls = snap.upstream_tls("api.example", 80, None).expect("tls");
        assert!(matches!(snap.tls_credential("egress", tls), Some(Ok(_))));
    }

    #[test]
    fn key_material_never_dumped_or_printed() {
        let secret = secret_yaml(
            "egress",
            "api-client",
            "kubernetes.io/tls",
            &[("tls.crt", CERT), ("tls.key", KEY), ("ca.crt", CA)],
        );
        let snap = crate::load_sources([("mesh.yaml", MESH), ("secret.yaml", secret.as_str())])
            .expect("valid");
        let dump = serde_json::to_string(&snap).expect("json");
        let debug = format!("{snap:?}");
        let loaded = crate::load::read_sources([crate::load::SourceFile {
            name: "s.yaml",
            text: &secret,
        }]);
        let raw = format!("{:?}", loaded.resources.secrets);
        for text in [&dump, &debug, &raw] {
            for needle in ["U0VDUkVUS0VZ", "PRIVATE KEY", &b64(KEY)[..16], "Q0VSVA"] {
                assert!(!text.contains(needle), "{needle} leaked: {text}");
            }
        }
        // The dump still says which Secret holds what.
        assert!(dump.contains("\"egress/api-client\""), "{dump}");
        assert!(dump.contains("<redacted>"), "{dump}");
        // A bad value is located without quoting it.
        let bad = "apiVersion: v1\nkind: Secret\nmetadata: {name: s, namespace: egress}\ndata: {tls.key: 'U0VDUkVU$0tFWQ=='}\n";
        let err = crate::load_sources([("bad.yaml", bad)]).expect_err("bad base64");
        let text = err.to_string();
        assert!(
            text.contains(
                "bad.yaml:document 1: Secret egress/s: data[\"tls.key\"]: not valid base64"
            ),
            "{text}"
        );
        assert!(!text.contains("U0VDUkVU"), "{text}");
    }
}
