//! The hosts the console knows, saved as JSON in the user's config folder
//! (`<config dir>/parvis/console.json`, e.g. `~/.config/parvis/console.json` or
//! `%APPDATA%\parvis\console.json`). `$PARVIS_CONSOLE_CONFIG` names another file.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

/// Why the config could not be read or written.
#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{path} is not a valid console config: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("this system has no user config folder; set PARVIS_CONSOLE_CONFIG")]
    NoConfigDir,
}

/// One agent, as the user entered it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostConfig {
    /// What the console calls it.
    pub name: String,
    /// `HOST:PORT`.
    pub addr: String,
    /// The bearer token the agent printed.
    pub token: String,
    /// The pinned TLS certificate fingerprint; `None` = plain HTTP/2 (loopback only).
    #[serde(default)]
    pub fingerprint: Option<String>,
}

impl HostConfig {
    /// How `proto::client` reaches it.
    pub fn target(&self) -> proto::client::Target {
        proto::client::Target {
            addr: self.addr.clone(),
            fingerprint: self.fingerprint.clone(),
            token: self.token.clone(),
        }
    }
}

/// The whole config file.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub hosts: Vec<HostConfig>,
}

/// Where the config lives by default.
pub fn default_path() -> Result<PathBuf, ConfigError> {
    if let Some(p) = std::env::var_os("PARVIS_CONSOLE_CONFIG").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    dirs::config_dir()
        .map(|d| d.join("parvis").join("console.json"))
        .ok_or(ConfigError::NoConfigDir)
}

impl Config {
    /// Read `path`; a missing file is an empty config.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        match std::fs::read(path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ConfigError::Parse {
                path: path.to_path_buf(),
                source,
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Config::default()),
            Err(source) => Err(ConfigError::Read {
                path: path.to_path_buf(),
                source,
            }),
        }
    }

    /// Write `path` atomically (temp file, then rename), readable by the user only where
    /// the system has such permissions: it holds tokens.
    pub fn save(&self, path: &Path) -> Result<(), ConfigError> {
        let err = |source| ConfigError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let mut text = serde_json::to_vec_pretty(self).map_err(|e| err(e.into()))?;
        text.push(b'\n');
        let tmp = path.with_extension("json.tmp");
        std::fs::write(&tmp, &text).map_err(err)?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
        }
        std::fs::rename(&tmp, path).map_err(err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_missing_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/console.json");
        assert_eq!(Config::load(&p).unwrap(), Config::default());
        let c = Config {
            hosts: vec![HostConfig {
                name: "lab".into(),
                addr: "10.0.0.2:7443".into(),
                token: "pvs_x".into(),
                fingerprint: Some("AA:BB".into()),
            }],
        };
        c.save(&p).unwrap();
        assert_eq!(Config::load(&p).unwrap(), c);
        std::fs::write(&p, b"{nope").unwrap();
        assert!(matches!(Config::load(&p), Err(ConfigError::Parse { .. })));
    }
}
