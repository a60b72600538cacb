//! The daemon's configuration: `/etc/imaged/imaged.toml`.
//!
//! Every key has a default, so the daemon runs with no file at all (local libvirt, repository
//! under `/var/lib/imaged`). Unknown keys and bad values are rejected at start with the key's
//! name, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{invalid, Error, Result};

/// Where the daemon looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imaged/imaged.toml";
/// Default unix socket of the gRPC API.
pub const DEFAULT_SOCKET: &str = "/run/imaged/imaged.sock";
/// Default `[daemon] state_dir` (systemd's `StateDirectory=imaged`).
pub const DEFAULT_STATE_DIR: &str = "/var/lib/imaged";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub daemon: DaemonConfig,
    pub libvirt: LibvirtConfig,
    pub repository: RepositoryConfig,
    pub capture: CaptureConfig,
    pub export: ExportConfig,
    /// Remote stream targets by name: `[targets.NAME]` with `kind = "glance"` or `"s3"`.
    pub targets: std::collections::BTreeMap<String, crate::upload::TargetConfig>,
}

/// `[daemon]`: how the API is served and logged.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct DaemonConfig {
    /// Unix socket path of the gRPC API.
    pub socket: PathBuf,
    /// Permission bits of the socket, octal as a string ("0660").
    pub socket_mode: String,
    /// Group that owns the socket ("" keeps root's group).
    pub socket_group: String,
    /// Optional TCP address ("127.0.0.1:7070"); empty disables TCP.
    pub tcp_listen: String,
    /// error, warn, info, debug or trace.
    pub log_level: String,
    /// How many operations may run at once; more wait QUEUED.
    pub max_running_operations: usize,
    /// No longer used (finished operations are kept for `operation_retention_days`); still
    /// accepted so that existing config files load.
    pub keep_finished_operations: usize,
    /// Directory of the daemon's own durable state (the operations database
    /// `operations.db`); must survive reboots, so not under `/run`.
    pub state_dir: PathBuf,
    /// How many days a finished operation stays readable (`Get`/`List`), 1 to 3650; pruned at
    /// start and hourly. A `request_id` is honoured for 24 hours regardless.
    pub operation_retention_days: u32,
}

impl Default for DaemonConfig {
    fn default() -> Self {
        DaemonConfig {
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: "0660".into(),
            socket_group: String::new(),
            tcp_listen: String::new(),
            log_level: "info".into(),
            max_running_operations: 2,
            keep_finished_operations: 200,
            state_dir: PathBuf::from(DEFAULT_STATE_DIR),
            operation_retention_days: 7,
        }
    }
}

/// `[libvirt]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LibvirtConfig {
    /// Connection URI.
    pub uri: String,
    /// How long a libvirt call that finds libvirtd unreachable (restarting, stopped) waits for
    /// it, retrying with backoff, before failing UNAVAILABLE; 0 fails at once. 0 to 3600.
    pub reconnect_timeout_secs: u64,
}

impl Default for LibvirtConfig {
    fn default() -> Self {
        LibvirtConfig {
            uri: "qemu:///system".into(),
            reconnect_timeout_secs: 60,
        }
    }
}

impl LibvirtConfig {
    /// [`LibvirtConfig::reconnect_timeout_secs`] as a duration.
    pub fn reconnect_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(self.reconnect_timeout_secs)
    }
}

/// `[repository]`: the local chunk store.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RepositoryConfig {
    /// Directory of the local repository.
    pub path: PathBuf,
    /// Largest virtual size a capture or import may have, in bytes; written as a number of
    /// bytes or with a binary unit: "64T", "2P", "512G" (K, M, G, T, P, E; an "iB" is allowed).
    #[serde(deserialize_with = "size_value")]
    pub max_virtual_size: u64,
}

/// Default [`RepositoryConfig::max_virtual_size`]: 64 TiB.
pub const DEFAULT_MAX_VIRTUAL_SIZE: u64 = 64 << 40;

impl Default for RepositoryConfig {
    fn default() -> Self {
        RepositoryConfig {
            path: PathBuf::from("/var/lib/imaged/repo"),
            max_virtual_size: DEFAULT_MAX_VIRTUAL_SIZE,
        }
    }
}

/// Parses a byte size: digits, optionally followed by K, M, G, T, P or E (powers of 1024),
/// optionally followed by "iB" or "B".
pub fn parse_size(text: &str) -> Option<u64> {
    let t = text.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let digits = t.trim_end_matches(|c: char| c.is_ascii_alphabetic());
    let unit = &t[digits.len()..];
    let shift = match unit {
        "" => 0,
        "K" | "k" => 10,
        "M" => 20,
        "G" => 30,
        "T" => 40,
        "P" => 50,
        "E" => 60,
        _ => return None,
    };
    let n: u64 = digits.trim().parse().ok()?;
    n.checked_mul(1u64 << shift)
}

fn size_value<'de, D: serde::Deserializer<'de>>(d: D) -> std::result::Result<u64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Size {
        Bytes(u64),
        Text(String),
    }
    match Size::deserialize(d)? {
        Size::Bytes(n) => Ok(n),
        Size::Text(t) => parse_size(&t).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "{t:?} is not a size: write bytes or a number with K, M, G, T, P or E, e.g. \"64T\""
            ))
        }),
    }
}

/// `[capture]`: the data path.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CaptureConfig {
    /// The qemu-nbd binary.
    pub qemu_nbd: PathBuf,
    /// Parallel NBD connections (and hashing workers) per capture, 1 to 16.
    pub readers: usize,
    /// Directory for NBD sockets of running captures.
    pub run_dir: PathBuf,
    /// The longest a quiesced capture may keep the guest's filesystems frozen, in
    /// milliseconds (1 to 60000). When the backup job takes longer to begin, the guest is
    /// thawed at this bound and the capture fails rather than label an image quiesced that
    /// was taken after the thaw.
    pub max_freeze_ms: u64,
    /// How long a shutdown capture with `restart` and `restore_source` waits, after starting
    /// the guest again, for its agent to answer before the prep is undone (seconds, 1 to 3600).
    pub agent_wait_secs: u64,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            qemu_nbd: PathBuf::from("qemu-nbd"),
            readers: 2,
            run_dir: PathBuf::from("/run/imaged/nbd"),
            max_freeze_ms: 10_000,
            agent_wait_secs: 300,
        }
    }
}

/// `[export]`: image files this daemon writes on the host (exports and the file target).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ExportConfig {
    /// Permission bits of those files, octal as a string ("0600": root only). World-writable
    /// modes are refused.
    pub file_mode: String,
}

impl Default for ExportConfig {
    fn default() -> Self {
        ExportConfig {
            file_mode: "0600".into(),
        }
    }
}

impl Config {
    /// Reads `path`. A missing file is fine only when `required` is false (the default path).
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(e) => {
                return Err(Error::io(
                    format!("reading config file {}", path.display()),
                    e,
                ));
            }
        };
        Config::parse(&text).map_err(|e| invalid(format!("config file {}: {e}", path.display())))
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Config> {
        // toml's message names the key and the line; keep it on one line.
        let cfg: Config =
            toml::from_str(text).map_err(|e| invalid(e.to_string().replace('\n', " ")))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks values serde cannot: ranges, absolute paths, the socket mode.
    pub fn validate(&self) -> Result<()> {
        let d = &self.daemon;
        if !d.socket.is_absolute() {
            return Err(invalid(format!(
                "daemon.socket must be an absolute path, got {:?}",
                d.socket
            )));
        }
        self.socket_mode()?;
        self.export_file_mode()?;
        if !d.tcp_listen.is_empty() {
            let addr: std::net::SocketAddr = d.tcp_listen.parse().map_err(|_| {
                invalid(format!(
                    "daemon.tcp_listen must be an address like 127.0.0.1:7070, got {:?}",
                    d.tcp_listen
                ))
            })?;
            // The API can shut down and read any VM of the host: without TLS and client
            // certificates it must not be reachable from the network.
            if !addr.ip().is_loopback() {
                return Err(invalid(format!(
                    "daemon.tcp_listen {addr} is not a loopback address; this version serves TCP without TLS, \
                     so bind it to 127.0.0.1 (and tunnel) or use the unix socket"
                )));
            }
        }
        self.log_level()?;
        if !(1..=64).contains(&d.max_running_operations) {
            return Err(invalid(format!(
                "daemon.max_running_operations must be 1 to 64, got {}",
                d.max_running_operations
            )));
        }
        if !d.state_dir.is_absolute() {
            return Err(invalid(format!(
                "daemon.state_dir must be an absolute path, got {:?}",
                d.state_dir
            )));
        }
        if !(1..=3650).contains(&d.operation_retention_days) {
            return Err(invalid(format!(
                "daemon.operation_retention_days must be 1 to 3650, got {}",
                d.operation_retention_days
            )));
        }
        if self.libvirt.uri.trim().is_empty() {
            return Err(invalid("libvirt.uri must not be empty"));
        }
        if self.libvirt.reconnect_timeout_secs > 3600 {
            return Err(invalid(format!(
                "libvirt.reconnect_timeout_secs must be 0 to 3600, got {}",
                self.libvirt.reconnect_timeout_secs
            )));
        }
        if !self.repository.path.is_absolute() {
            return Err(invalid(format!(
                "repository.path must be an absolute path, got {:?}",
                self.repository.path
            )));
        }
        if self.repository.max_virtual_size < 1 << 20 {
            return Err(invalid(format!(
                "repository.max_virtual_size must be at least 1M, got {} bytes",
                self.repository.max_virtual_size
            )));
        }
        if !(1..=16).contains(&self.capture.readers) {
            return Err(invalid(format!(
                "capture.readers must be 1 to 16, got {}",
                self.capture.readers
            )));
        }
        if !(1..=60_000).contains(&self.capture.max_freeze_ms) {
            return Err(invalid(format!(
                "capture.max_freeze_ms must be 1 to 60000, got {}",
                self.capture.max_freeze_ms
            )));
        }
        if !(1..=3600).contains(&self.capture.agent_wait_secs) {
            return Err(invalid(format!(
                "capture.agent_wait_secs must be 1 to 3600, got {}",
                self.capture.agent_wait_secs
            )));
        }
        for (name, t) in &self.targets {
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(invalid(format!(
                    "targets.{name}: a target name may hold letters, digits, '-' and '_'"
                )));
            }
            t.clone()
                .build()
                .map_err(|e| invalid(format!("targets.{name}: {}", e.chain())))?;
        }
        if !self.capture.run_dir.is_absolute() {
            return Err(invalid(format!(
                "capture.run_dir must be an absolute path, got {:?}",
                self.capture.run_dir
            )));
        }
        Ok(())
    }

    /// `daemon.socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32> {
        let s = self.daemon.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => Err(invalid(format!(
                "daemon.socket_mode must be octal permission bits like \"0660\", got {:?}",
                self.daemon.socket_mode
            ))),
        }
    }

    /// `export.file_mode` as permission bits (never world-writable).
    pub fn export_file_mode(&self) -> Result<u32> {
        crate::hostfile::parse_mode(&self.export.file_mode, "export.file_mode")
    }

    /// `daemon.log_level` as a tracing level.
    pub fn log_level(&self) -> Result<tracing::Level> {
        self.daemon.log_level.parse().map_err(|_| {
            invalid(format!(
                "daemon.log_level must be one of error, warn, info, debug, trace; got {:?}",
                self.daemon.log_level
            ))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("").unwrap();
        assert_eq!(c.libvirt.uri, "qemu:///system");
        assert_eq!(
            c.libvirt.reconnect_timeout(),
            std::time::Duration::from_secs(60)
        );
        assert_eq!(c.socket_mode().unwrap(), 0o660);
        assert_eq!(c.export_file_mode().unwrap(), 0o600);
        assert_eq!(c.repository.path, PathBuf::from("/var/lib/imaged/repo"));
        assert_eq!(c.daemon.state_dir, PathBuf::from("/var/lib/imaged"));
        assert_eq!(c.daemon.operation_retention_days, 7);
    }

    #[test]
    fn max_virtual_size_takes_units() {
        assert_eq!(
            Config::parse("").unwrap().repository.max_virtual_size,
            64 << 40
        );
        for (text, want) in [
            ("\"2P\"", 2u64 << 50),
            ("\"512GiB\"", 512 << 30),
            ("1048576", 1 << 20),
        ] {
            let c = Config::parse(&format!("[repository]\nmax_virtual_size = {text}")).unwrap();
            assert_eq!(c.repository.max_virtual_size, want, "{text}");
        }
        for bad in ["\"lots\"", "\"99E\"", "12"] {
            let e = Config::parse(&format!("[repository]\nmax_virtual_size = {bad}")).unwrap_err();
            assert!(e.to_string().contains("max_virtual_size"), "{bad}: {e}");
        }
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Config::parse("[repository]\npaht = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("paht"), "{e}");
    }

    #[test]
    fn bad_values_are_named() {
        for (text, key) in [
            ("[daemon]\nsocket_mode = \"999\"", "daemon.socket_mode"),
            ("[daemon]\nsocket = \"rel.sock\"", "daemon.socket"),
            ("[daemon]\ntcp_listen = \"nowhere\"", "daemon.tcp_listen"),
            (
                "[daemon]\ntcp_listen = \"0.0.0.0:7070\"",
                "daemon.tcp_listen",
            ),
            ("[daemon]\nlog_level = \"loud\"", "daemon.log_level"),
            ("[daemon]\nstate_dir = \"state\"", "daemon.state_dir"),
            (
                "[daemon]\noperation_retention_days = 0",
                "daemon.operation_retention_days",
            ),
            (
                "[daemon]\noperation_retention_days = 3651",
                "daemon.operation_retention_days",
            ),
            ("[capture]\nreaders = 0", "capture.readers"),
            (
                "[libvirt]\nreconnect_timeout_secs = 7200",
                "libvirt.reconnect_timeout_secs",
            ),
            ("[repository]\npath = \"repo\"", "repository.path"),
            ("[export]\nfile_mode = \"0666\"", "export.file_mode"),
            ("[export]\nfile_mode = \"rw\"", "export.file_mode"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.to_string().contains(key), "{text}: {e}");
        }
        let e = Config::parse("[capture]\nreaders = \"two\"").unwrap_err();
        assert!(e.to_string().contains("readers"), "{e}");
    }

    #[test]
    fn missing_default_file_is_fine_missing_explicit_is_not() {
        let p = Path::new("/nonexistent/imaged.toml");
        assert!(Config::load(p, false).is_ok());
        assert!(Config::load(p, true).is_err());
    }
}
