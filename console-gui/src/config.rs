//! The hosts the console knows: the saved-hosts file it shares with the `parvis` CLI
//! ([`proto::hosts`]: `hosts.json` in the user's config folder, e.g.
//! `~/.config/parvis/hosts.json` or `%APPDATA%\parvis\hosts.json`; `$PARVIS_CONFIG` names
//! another file).

pub use proto::hosts::{
    HostsError as ConfigError, HostsFile as Config, SavedHost as HostConfig, default_path,
};
