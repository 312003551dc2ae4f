//! `curl` run inside a namespace, with its result as data.

use std::{collections::BTreeMap, time::Duration};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::Netns;

/// Default `--max-time` unless the caller passes one.
const DEFAULT_MAX_TIME: &str = "20";

/// What one `curl` run produced. A failed transfer (refused, reset, timeout) is not an error
/// here: `exit_code` says what happened, so tests can assert on failures too.
#[derive(Debug, Clone)]
pub struct CurlOutput {
    /// curl's exit code (0 = transfer completed, 7 = could not connect, 28 = timeout, ...).
    pub exit_code: i32,
    /// HTTP status of the last response, 0 when there was none.
    pub status: u16,
    /// Headers of the last response, names lower-cased.
    pub headers: BTreeMap<String, Vec<String>>,
    pub body: Vec<u8>,
    /// `time_total` as curl measured it.
    pub time_total: Duration,
    pub stderr: String,
}

impl CurlOutput {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .get(&name.to_ascii_lowercase())
            .and_then(|values| values.first())
            .map(String::as_str)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

impl Netns {
    /// Runs `curl -sS <args>` inside the namespace (body to a temp file, status, headers and timing
    /// from curl's JSON write-out). `--max-time 20` is added unless `args` sets `--max-time`/`-m`.
    pub fn curl(&self, args: &[&str]) -> Result<CurlOutput> {
        let dir = tempfile::tempdir().context("curl temp dir")?;
        let body_path = dir.path().join("body");
        let mut command = self.command("curl");
        command.args(["-sS", "-o"]).arg(&body_path);
        // Two JSON documents: the transfer's variables, then the last response's headers.
        command.args(["-w", "%{json}\n%{header_json}"]);
        if !args.iter().any(|a| *a == "--max-time" || *a == "-m") {
            command.args(["--max-time", DEFAULT_MAX_TIME]);
        }
        command.args(args);
        let output = command
            .output()
            .with_context(|| format!("running {command:?}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let mut docs = serde_json::Deserializer::from_str(&stdout).into_iter::<Value>();
        let vars = match docs.next() {
            Some(Ok(vars)) => vars,
            _ => bail!(
                "curl {args:?} printed no write-out ({}); stderr: {}",
                output.status,
                String::from_utf8_lossy(&output.stderr).trim()
            ),
        };
        let headers = match docs.next() {
            Some(Ok(Value::Object(map))) => map
                .into_iter()
                .map(|(name, values)| {
                    let values = match values {
                        Value::Array(items) => items
                            .into_iter()
                            .map(|v| v.as_str().unwrap_or_default().to_owned())
                            .collect(),
                        other => vec![other.as_str().unwrap_or_default().to_owned()],
                    };
                    (name.to_ascii_lowercase(), values)
                })
                .collect(),
            _ => BTreeMap::new(),
        };
        let status = vars
            .get("http_code")
            .or_else(|| vars.get("response_code"))
            .and_then(Value::as_u64)
            .and_then(|code| u16::try_from(code).ok())
            .unwrap_or(0);
        let exit_code = vars
            .get("exitcode")
            .and_then(Value::as_i64)
            .and_then(|code| i32::try_from(code).ok())
            .or(output.status.code())
            .unwrap_or(-1);
        let time_total = vars
            .get("time_total")
            .and_then(Value::as_f64)
            .filter(|t| t.is_finite() && *t >= 0.0)
            .map(Duration::from_secs_f64)
            .unwrap_or_default();
        // No body file means no body (e.g. connection refused).
        let body = std::fs::read(&body_path).unwrap_or_default();
        Ok(CurlOutput {
            exit_code,
            status,
            headers,
            body,
            time_total,
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        })
    }
}
