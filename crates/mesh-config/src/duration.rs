//! Durations as Istio users write them: protobuf JSON (`"5s"`, `"0.5s"`) and Go style
//! (`"100ms"`, `"1m30s"`, `"1h"`).
use std::time::Duration;

pub fn parse(s: &str) -> Result<Duration, String> {
    let err = || format!("invalid duration {s:?} (expected e.g. \"5s\", \"100ms\", \"1m30s\")");
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(err());
    }
    if rest == "0" {
        return Ok(Duration::ZERO);
    }
    let mut total = 0f64;
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .ok_or_else(err)?;
        if num_end == 0 {
            return Err(err());
        }
        let n: f64 = rest[..num_end].parse().map_err(|_| err())?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let scale = match &rest[..unit_end] {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            _ => return Err(err()),
        };
        total += n * scale;
        rest = &rest[unit_end..];
    }
    if !total.is_finite() || total > 1e12 {
        return Err(err());
    }
    Ok(Duration::from_secs_f64(total))
}

/// Serialises a duration as a compact string (`"5s"`, `"250ms"`) in dumps.
pub(crate) mod ser {
    use serde::Serializer;
    use std::time::Duration;

    pub fn opt<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => one(d, s),
            None => s.serialize_none(),
        }
    }

    pub fn one<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        if d.subsec_nanos() == 0 {
            s.serialize_str(&format!("{}s", d.as_secs()))
        } else {
            s.serialize_str(&format!("{}ms", d.as_secs_f64() * 1e3))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let ok = [
            ("5s", Duration::from_secs(5)),
            ("0.5s", Duration::from_millis(500)),
            ("100ms", Duration::from_millis(100)),
            ("1m30s", Duration::from_secs(90)),
            ("1h", Duration::from_secs(3600)),
            ("0", Duration::ZERO),
            ("250us", Duration::from_micros(250)),
        ];
        for (s, want) in ok {
            assert_eq!(parse(s), Ok(want), "{s}");
        }
        for bad in ["", "5", "s", "5x", "-1s", "1.2.3s", "ms5"] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
