//! The configuration file: reading it, checking it, and turning it into proxy-core
//! services. Every problem is reported as `FILE:LINE:COLUMN: KEY: message`, all of
//! them at once, before anything listens.

mod build;
mod dns;
mod location;
mod schema;
mod shared;
pub mod tls;
pub mod values;

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

pub use build::{build, ListenerPlan, Plan};
pub use schema::Config;
pub use shared::Shared;

/// The configuration used when no file is given: listen on 127.0.0.1:8080 and forward
/// everything to uvicorn's default address, 127.0.0.1:8000.
pub const DEFAULT_CONFIG: &str = include_str!("default.toml");

/// One problem in a config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostic {
    /// The file.
    pub file: PathBuf,
    /// 1-based line, 0 when unknown.
    pub line: usize,
    /// 1-based column, 0 when unknown.
    pub column: usize,
    /// The key, as a dotted path (`server[0].location[1].proxy_pass`), when known.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for Diagnostic {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}: ", self.file.display(), self.line, self.column)?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        f.write_str(&self.message)
    }
}

/// A config file's text and name, for locating spans.
#[derive(Debug)]
pub struct Source {
    /// The file name shown in messages.
    pub file: PathBuf,
    /// The file's text.
    pub text: String,
}

impl Source {
    /// Read `path`.
    pub fn read(path: &Path) -> Result<Source, Vec<Diagnostic>> {
        match std::fs::read_to_string(path) {
            Ok(text) => Ok(Source {
                file: path.to_owned(),
                text,
            }),
            Err(e) => Err(vec![Diagnostic {
                file: path.to_owned(),
                line: 0,
                column: 0,
                key: String::new(),
                message: format!("cannot read: {e}"),
            }]),
        }
    }

    /// The embedded default config.
    pub fn default_config() -> Source {
        Source {
            file: PathBuf::from("<default config>"),
            text: DEFAULT_CONFIG.to_owned(),
        }
    }

    /// The directory relative paths in this file are resolved against (the file's own;
    /// the working directory for the embedded and command-line configs).
    pub fn base_dir(&self) -> PathBuf {
        match self.file.parent() {
            Some(p) if !p.as_os_str().is_empty() && self.file.is_file() => p.to_owned(),
            _ => PathBuf::from("."),
        }
    }

    /// A diagnostic at byte `span` of this file.
    pub fn diag(
        &self,
        span: Option<Range<usize>>,
        key: impl Into<String>,
        message: impl Into<String>,
    ) -> Diagnostic {
        let (line, column) = span.map_or((0, 0), |s| self.line_col(s.start));
        Diagnostic {
            file: self.file.clone(),
            line,
            column,
            key: key.into(),
            message: message.into(),
        }
    }

    fn line_col(&self, offset: usize) -> (usize, usize) {
        let before = self.text.get(..offset).unwrap_or(&self.text);
        let line = before.matches('\n').count() + 1;
        let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
        (line, column)
    }

    /// Parse the TOML into the schema.
    pub fn parse(&self) -> Result<Config, Vec<Diagnostic>> {
        toml::from_str::<Config>(&self.text).map_err(|e| {
            let message = e.message().trim().to_owned();
            let key = key_at(&self.text, e.span());
            vec![self.diag(e.span(), key, message)]
        })
    }
}

/// Best effort: the key written on the line where `span` starts (`key = value`).
fn key_at(text: &str, span: Option<Range<usize>>) -> String {
    let Some(span) = span else {
        return String::new();
    };
    let start = text
        .get(..span.start)
        .and_then(|t| t.rfind('\n'))
        .map_or(0, |i| i + 1);
    let line = text
        .get(start..)
        .and_then(|t| t.lines().next())
        .unwrap_or("");
    match line.split_once('=') {
        Some((k, _)) if !k.trim_start().starts_with('[') => k.trim().to_owned(),
        _ => line.trim().to_owned(),
    }
}

/// Read, parse and check a config; the result is ready to run. Must run inside a tokio
/// runtime. `shared` carries what survives a reload (zones, DNS-backed groups, log
/// files, metrics).
pub async fn load(source: &Source, shared: &mut Shared) -> Result<Plan, Vec<Diagnostic>> {
    let config = source.parse()?;
    build(source, &config, shared).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(source: &Source) -> Result<Plan, Vec<Diagnostic>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async { super::load(source, &mut Shared::default()).await })
    }

    fn src(text: &str) -> Source {
        Source {
            file: PathBuf::from("test.toml"),
            text: text.to_owned(),
        }
    }

    #[test]
    fn default_config_is_valid() {
        let plan = load(&Source::default_config()).unwrap();
        assert_eq!(plan.listeners.len(), 1);
        assert_eq!(plan.listeners[0].listen.addr.to_string(), "127.0.0.1:8080");
    }

    #[test]
    fn unknown_key_is_reported_with_line_and_key() {
        let errs = load(&src("[[server]]\nlisten = [\"127.0.0.1:1\"]\nlisn = 3\n")).unwrap_err();
        assert_eq!(errs.len(), 1);
        assert_eq!(errs[0].line, 3, "{}", errs[0]);
        assert!(
            errs[0].to_string().starts_with("test.toml:3:"),
            "{}",
            errs[0]
        );
        assert!(errs[0].to_string().contains("lisn"), "{}", errs[0]);
    }

    #[test]
    fn bad_duration_is_reported() {
        let text = "[[server]]\nlisten = [\"127.0.0.1:1\"]\nproxy_read_timeout = \"soon\"\n";
        let errs = load(&src(text)).unwrap_err();
        assert_eq!(errs[0].line, 3, "{}", errs[0]);
        assert_eq!(errs[0].key, "proxy_read_timeout");
    }

    #[test]
    fn semantic_errors_are_all_reported() {
        let text = r#"
[[server]]
listen = ["127.0.0.1:1"]

[[server.location]]
path = "/"
proxy_pass = "nowhere"

[[server.location]]
path = "~ ("
return = 200
"#;
        let errs = load(&src(text)).unwrap_err();
        assert_eq!(errs.len(), 2, "{errs:?}");
        assert_eq!(errs[0].line, 7);
        assert!(errs[0].message.contains("nowhere"));
        assert_eq!(errs[1].line, 10);
        assert_eq!(errs[1].key, "server[0].location[1].path");
    }
}
