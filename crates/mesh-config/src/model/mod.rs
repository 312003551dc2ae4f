//! Serde models of the Kubernetes / Istio / Gateway API objects we read.
//!
//! Istio and Gateway API `spec`s deny unknown fields so typos surface as errors; Kubernetes core
//! kinds (Namespace, Service, Pod, ConfigMap) and `metadata` read only the fields we use and
//! ignore the rest, because real objects exported from a cluster carry many more.

pub mod asm;
pub mod core;
pub mod gateway;
pub mod mesh;
pub mod meta;
pub mod networking;
pub mod security;

pub use meta::{Labels, ObjectMeta};

use serde::{Deserialize, Deserializer};

/// An integer that users sometimes quote (`"8080"`) — Istio's `Operation.ports` are strings,
/// Kubernetes `targetPort` is int-or-string.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(untagged)]
pub enum IntOrString {
    Int(i64),
    String(String),
}

impl<'de> Deserialize<'de> for IntOrString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = IntOrString;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("an integer or a string")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<IntOrString, E> {
                Ok(IntOrString::Int(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<IntOrString, E> {
                i64::try_from(v)
                    .map(IntOrString::Int)
                    .map_err(|_| E::custom("integer out of range"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<IntOrString, E> {
                Ok(IntOrString::String(v.to_owned()))
            }
        }
        d.deserialize_any(V)
    }
}

impl std::fmt::Display for IntOrString {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IntOrString::Int(i) => write!(f, "{i}"),
            IntOrString::String(s) => f.write_str(s),
        }
    }
}

/// Any YAML value: used for Istio fields we accept (so real configs load) but do not act on.
/// The compiler logs when one is set.
pub type Opaque = serde_yaml_ng::Value;
