//! Typed configuration: one TOML file, overridden key by key from the environment.
//!
//! Loading is deliberately two-phase ([`layering`]). Each key is first deserialized on its own
//! (so one bad key never hides another), then the whole tree is validated for meaning (ranges,
//! formats, keys that only make sense together): each section checks itself next to its type
//! ([`sections`]), and [`Config::validate`] adds the checks that span sections. Every problem
//! found in either phase is reported at once, because an operator fixing a config should not
//! have to restart the daemon once per typo.
//!
//! The list of sections is written once, in the `sections!` invocation below: the struct, the
//! names the loader accepts and the per-section validation all come from it.

mod layering;
#[cfg(test)]
mod reference;
mod sections;

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

pub use layering::{load, load_from_str, redact_url, resolve_path, EffectiveEntry, LoadedConfig, Source};
pub use sections::*;

/// Env var naming the config file when `--config` is absent.
pub(crate) const CONFIG_PATH_ENV: &str = "CRUDDUR_SYNCD_CONFIG";
/// Where a packaged install keeps its config.
pub(crate) const DEFAULT_CONFIG_PATH: &str = "/etc/cruddur-syncd/config.toml";
/// Prefix of per-key overrides: `CRUDDUR_SYNCD__POSTGRES__URL`.
pub(crate) const ENV_PREFIX: &str = "CRUDDUR_SYNCD__";

/// Declares the sections of the file: the [`Config`] struct, the section names the loader
/// accepts, how one key of a section is checked alone, and the per-section validation.
macro_rules! sections {
    ($($name:ident: $ty:ty),* $(,)?) => {
        /// The whole configuration: one field per `[section]` of the file.
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
        #[serde(default, deny_unknown_fields)]
        pub struct Config {
            $(pub $name: $ty,)*
        }

        impl Config {
            /// Every section's name, in the order of the struct.
            pub(crate) const SECTIONS: &'static [&'static str] = &[$(stringify!($name)),*];

            /// How one key of `section` is deserialized on its own (None: no such section).
            fn probe_key(section: &str) -> Option<fn(toml::Table) -> Result<(), String>> {
                match section {
                    $(stringify!($name) => Some(layering::probe::<$ty>),)*
                    _ => None,
                }
            }

            fn validate_sections(&self, out: &mut Vec<Problem>) {
                $(self.$name.validate(&mut Problems { section: stringify!($name), out });)*
            }
        }
    };
}

sections! {
    aws: AwsConfig,
    dynamodb: DynamoDbConfig,
    stream: StreamConfig,
    cache: CacheConfig,
    http: HttpConfig,
    admin: AdminConfig,
    auth: AuthConfig,
    postgres: PostgresConfig,
    reconcile: ReconcileConfig,
    projector: ProjectorConfig,
    fanout: FanoutConfig,
    log: LogConfig,
}

impl Config {
    /// Checks of meaning, run after every key has its type: each section's own, then the ones
    /// that span sections.
    pub(crate) fn validate(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        self.validate_sections(&mut out);
        if self.http.listen.port() != 0 && self.http.listen == self.admin.listen {
            out.push(Problem {
                key: "admin.listen".into(),
                origin: None,
                message: format!("{} is also http.listen; the admin listener needs its own address", self.admin.listen),
            });
        }
        out
    }
}

/// Where a section's checks put what they find: `bad("key", ...)` names `section.key`.
pub(crate) struct Problems<'a> {
    section: &'static str,
    out: &'a mut Vec<Problem>,
}

impl Problems<'_> {
    pub(crate) fn bad(&mut self, key: &str, message: impl Into<String>) {
        self.out.push(Problem { key: format!("{}.{key}", self.section), origin: None, message: message.into() });
    }
}

/// One thing wrong with a configuration, naming where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// `section.key`, or the section/file when no single key is at fault.
    pub key: String,
    /// The file or env var that supplied the bad value, when one did.
    pub origin: Option<String>,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.origin {
            Some(origin) => write!(f, "{} ({origin}): {}", self.key, self.message),
            None => write!(f, "{}: {}", self.key, self.message),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    #[error("config file {path} is not valid TOML: {reason}")]
    Syntax { path: PathBuf, reason: String },
    #[error("{}", render_problems(path, problems))]
    Invalid { path: PathBuf, problems: Vec<Problem> },
}

fn render_problems(path: &Path, problems: &[Problem]) -> String {
    let mut out = format!("config {} has {} problem(s):", path.display(), problems.len());
    for p in problems {
        out.push_str("\n  ");
        out.push_str(&p.to_string());
    }
    out
}

impl ConfigError {
    pub fn problems(&self) -> &[Problem] {
        match self {
            ConfigError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}
