//! Hostname → value with Istio's host semantics: exact names first, then the most specific
//! wildcard (`*.example.com` matches `a.example.com` and `a.b.example.com`, not `example.com`),
//! then `*`. Names are compared case-insensitively, with any trailing dot ignored.
use std::borrow::Cow;
use std::collections::HashMap;

/// Looked up on every request: foldhash, not SipHash. The keys come from configuration, so
/// no client can choose colliding ones.
type Map<T> = HashMap<String, T, foldhash::fast::RandomState>;

#[derive(Debug, Clone)]
pub struct HostMap<T> {
    exact: Map<T>,
    /// Keyed by the suffix including its leading dot (`.example.com`).
    wildcard: Map<T>,
    any: Option<T>,
}

impl<T> Default for HostMap<T> {
    fn default() -> Self {
        HostMap {
            exact: Map::default(),
            wildcard: Map::default(),
            any: None,
        }
    }
}

/// Lowercases and strips one trailing dot, borrowing when the name is already normal.
pub(crate) fn normalize(host: &str) -> Cow<'_, str> {
    let h = host.strip_suffix('.').unwrap_or(host);
    if h.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(h.to_ascii_lowercase())
    } else {
        Cow::Borrowed(h)
    }
}

impl<T> HostMap<T> {
    /// Inserts; returns the previous value for the same pattern, if any.
    pub fn insert(&mut self, pattern: &str, value: T) -> Option<T> {
        let p = normalize(pattern);
        if p == "*" {
            self.any.replace(value)
        } else if let Some(suffix) = p.strip_prefix('*') {
            self.wildcard.insert(suffix.to_owned(), value)
        } else {
            self.exact.insert(p.into_owned(), value)
        }
    }

    /// The entry stored under exactly this pattern (no wildcard matching).
    pub fn get_pattern(&self, pattern: &str) -> Option<&T> {
        let p = normalize(pattern);
        if p == "*" {
            self.any.as_ref()
        } else if let Some(suffix) = p.strip_prefix('*') {
            self.wildcard.get(suffix)
        } else {
            self.exact.get(p.as_ref())
        }
    }

    pub fn get_pattern_mut(&mut self, pattern: &str) -> Option<&mut T> {
        let p = normalize(pattern);
        if p == "*" {
            self.any.as_mut()
        } else if let Some(suffix) = p.strip_prefix('*') {
            self.wildcard.get_mut(suffix)
        } else {
            self.exact.get_mut(p.as_ref())
        }
    }

    /// Exact match, then the longest matching wildcard suffix, then `*`.
    pub fn lookup(&self, host: &str) -> Option<&T> {
        let h = normalize(host);
        if let Some(v) = self.exact.get(h.as_ref()) {
            return Some(v);
        }
        if !self.wildcard.is_empty() {
            // Suffixes from the longest (most specific) to the shortest.
            for (i, b) in h.bytes().enumerate() {
                if b == b'.'
                    && i > 0
                    && let Some(v) = self.wildcard.get(&h[i..])
                {
                    return Some(v);
                }
            }
        }
        self.any.as_ref()
    }

    pub fn len(&self) -> usize {
        self.exact.len() + self.wildcard.len() + usize::from(self.any.is_some())
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// All entries as `(pattern, value)`, unordered.
    pub fn iter(&self) -> impl Iterator<Item = (Cow<'_, str>, &T)> {
        self.exact
            .iter()
            .map(|(k, v)| (Cow::Borrowed(k.as_str()), v))
            .chain(
                self.wildcard
                    .iter()
                    .map(|(k, v)| (Cow::Owned(format!("*{k}")), v)),
            )
            .chain(self.any.iter().map(|v| (Cow::Borrowed("*"), v)))
    }
}

/// Serialised (in dumps) as a map sorted by pattern.
impl<T: serde::Serialize> serde::Serialize for HostMap<T> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let sorted: std::collections::BTreeMap<String, &T> =
            self.iter().map(|(k, v)| (k.into_owned(), v)).collect();
        s.collect_map(sorted)
    }
}

/// Does `host` match the Istio host `pattern` (exact or wildcard)?
pub fn host_matches(pattern: &str, host: &str) -> bool {
    let p = normalize(pattern);
    let h = normalize(host);
    if p == "*" {
        return true;
    }
    match p.strip_prefix('*') {
        Some(suffix) => h.len() > suffix.len() && h.ends_with(suffix),
        None => p == h,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookup_precedence() {
        let mut m = HostMap::default();
        m.insert("aliyun.com", 1);
        m.insert("*.aliyun.com", 2);
        m.insert("*.www.aliyun.com", 3);
        m.insert("*.com", 4);
        let cases = [
            ("aliyun.com", Some(1)),
            ("ALIYUN.com.", Some(1)),
            ("a.aliyun.com", Some(2)),
            ("x.www.aliyun.com", Some(3)),
            ("www.aliyun.com", Some(2)),
            ("example.com", Some(4)),
            ("com", None),
            ("example.org", None),
        ];
        for (host, want) in cases {
            assert_eq!(m.lookup(host).copied(), want, "{host}");
        }
        m.insert("*", 9);
        assert_eq!(m.lookup("example.org"), Some(&9));
    }

    #[test]
    fn matches() {
        let cases = [
            ("*.example.com", "a.example.com", true),
            ("*.example.com", "a.b.example.com", true),
            ("*.example.com", "example.com", false),
            ("example.com", "Example.COM", true),
            ("*", "anything", true),
            ("a.com", "b.com", false),
        ];
        for (p, h, want) in cases {
            assert_eq!(host_matches(p, h), want, "{p} {h}");
        }
    }
}
