//! Validation errors: every problem found in one load, each located as
//! `file:document N: Kind namespace/name: field.path: problem`.
use std::fmt;
use std::sync::Arc;

/// Where an object came from: the file (relative to the config root, or the embedded name) and
/// the 1-based document index inside it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize)]
pub struct SourceRef {
    pub file: Arc<str>,
    pub document: usize,
}

impl fmt::Display for SourceRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:document {}", self.file, self.document)
    }
}

/// One validation problem. Fields that do not apply (a YAML syntax error has no kind yet) are
/// `None` and left out of the rendered line.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ConfigError {
    pub file: String,
    pub document: Option<usize>,
    pub kind: Option<String>,
    /// `namespace/name`, or `name` for cluster-scoped kinds.
    pub object: Option<String>,
    /// Dotted field path (`spec.http[0].route[1].weight`).
    pub path: Option<String>,
    pub message: String,
}

impl ConfigError {
    pub(crate) fn file(file: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            file: file.into(),
            document: None,
            kind: None,
            object: None,
            path: None,
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(d) = self.document {
            write!(f, ":document {d}")?;
        }
        f.write_str(":")?;
        if let Some(k) = &self.kind {
            write!(f, " {k}")?;
            if let Some(o) = &self.object {
                write!(f, " {o}")?;
            }
            f.write_str(":")?;
        }
        if let Some(p) = &self.path {
            write!(f, " {p}:")?;
        }
        write!(f, " {}", self.message)
    }
}

/// All the errors of one load. Never empty when returned as an `Err`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, serde::Serialize)]
#[serde(transparent)]
pub struct LoadErrors(pub Vec<ConfigError>);

impl LoadErrors {
    pub fn len(&self) -> usize {
        self.0.len()
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
    pub fn iter(&self) -> impl Iterator<Item = &ConfigError> {
        self.0.iter()
    }
}

impl fmt::Display for LoadErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} configuration error(s)", self.0.len())?;
        for e in &self.0 {
            write!(f, "\n  {e}")?;
        }
        Ok(())
    }
}

/// Collects errors for one object while it is validated/compiled.
pub(crate) struct ObjErrors<'a> {
    pub source: &'a SourceRef,
    pub kind: &'static str,
    pub object: String,
    pub out: &'a mut Vec<ConfigError>,
}

impl ObjErrors<'_> {
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        self.out.push(ConfigError {
            file: self.source.file.to_string(),
            document: Some(self.source.document),
            kind: Some(self.kind.to_owned()),
            object: Some(self.object.clone()),
            path: (!path.is_empty()).then_some(path),
            message: message.into(),
        });
    }
}
