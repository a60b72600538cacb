//! The daemon's configuration: `/etc/imaged/imaged.toml`.
//!
//! Every key has a default, so the daemon runs with no file at all (local libvirt, repository
//! under `/var/lib/imaged`). Unknown keys and bad values are rejected at start with the key's
//! name, so a typo never silently falls back to a default.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::error::{invalid, Error, ErrorKind, Result};

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
    /// `[tls]`: the TCP listener's certificate and the CA of client certificates.
    pub tls: Option<TlsConfig>,
    /// `[[policy]]`: who has which role. Empty: uid 0 on the unix socket is admin, nobody
    /// else has a role.
    pub policy: Vec<PolicyEntry>,
    /// `[paths]`: the host directories import reads from and export writes into.
    pub paths: PathsConfig,
}

/// A role of the API: each includes the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Role {
    /// Reads: get, list, watch, wait.
    Viewer,
    /// Viewer, and starts and steers work: capture, import, export, plan prep, update, cancel.
    Operator,
    /// Everything, deletions included.
    Admin,
}

impl Role {
    /// Every role, lowest first.
    pub const ALL: [Role; 3] = [Role::Viewer, Role::Operator, Role::Admin];

    /// The name used in the config and in messages.
    pub fn name(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.name() == name)
    }
}

/// One `[[policy]]` entry: a role, and who gets it. An identity matches when any one list
/// holds it; the roles of every matching entry add up.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyEntry {
    /// viewer, operator or admin.
    pub role: String,
    /// Unix socket peers by user id.
    pub unix_uids: Vec<u32>,
    /// Unix socket peers by group id: the peer's primary group or a supplementary group of
    /// its user in the host's user database.
    pub unix_gids: Vec<u32>,
    /// TLS clients by the common name (CN) of their certificate's subject, e.g. "cp1".
    pub tls_subjects: Vec<String>,
    /// TLS clients by a DNS or URI subject alternative name of their certificate, e.g.
    /// "cp1.example.org" or "spiffe://example.org/cp1".
    pub tls_sans: Vec<String>,
}

impl PolicyEntry {
    /// The role, checked by [`Config::validate`].
    pub fn role(&self) -> Option<Role> {
        Role::parse(&self.role)
    }
}

/// `[tls]`: mutual TLS of the TCP listener (`daemon.tcp_listen`). Re-read on SIGHUP.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// The server's certificate chain, PEM, leaf first.
    pub cert: PathBuf,
    /// The server's private key, PEM (PKCS#8, PKCS#1 or SEC1); not readable by others.
    pub key: PathBuf,
    /// The CA certificates (PEM) that client certificates must chain to.
    pub client_ca: PathBuf,
    /// How long a client has to finish the TLS handshake, in seconds (1 to 300; default 10).
    pub handshake_timeout_secs: u64,
}

impl TlsConfig {
    /// [`TlsConfig::handshake_timeout_secs`] as a duration (10 s when 0).
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self.handshake_timeout_secs {
            0 => 10,
            n => n,
        })
    }
}

/// `[paths]`: where import and export may touch the host. Besides the directories listed, the
/// daemon's own `<repository.path>/import` and `<repository.path>/export` (created 0700 at
/// start) are always allowed. A path is checked on the opened file or directory, so a
/// symbolic link or `..` cannot lead out.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct PathsConfig {
    /// Directories whose files (at any depth) may be imported.
    pub import_dirs: Vec<PathBuf>,
    /// Directories under which exports and file targets may be written.
    pub export_dirs: Vec<PathBuf>,
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
    /// How many operations one identity may have queued or running at once (1 to 10000).
    pub max_operations_per_identity: usize,
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
            max_operations_per_identity: 16,
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
    /// Read disk files on this host (cold captures, imports) in process: raw files directly,
    /// qcow2 chains through imago. `false` reads every file through qemu-nbd, as a way out
    /// should the native reader misread an image (qemu-nbd is also used for what the native
    /// reader does not take: a block device, a dirty or zstd qcow2, a protocol backing file).
    pub native_reader: bool,
    /// Live captures into a repository (local or imagerepo) make a checkpoint (a dirty bitmap
    /// in the disk's qcow2 image), and the next live capture of that disk reads only what was
    /// written since. `false`: every live capture reads the whole disk and makes none.
    pub incremental: bool,
}

impl Default for CaptureConfig {
    fn default() -> Self {
        CaptureConfig {
            qemu_nbd: PathBuf::from("qemu-nbd"),
            readers: 2,
            run_dir: PathBuf::from("/run/imaged/nbd"),
            max_freeze_ms: 10_000,
            agent_wait_secs: 300,
            native_reader: true,
            incremental: true,
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
    ///
    /// A file that holds secrets ([`Config::holds_secrets`]) must not be readable by group or
    /// others; the mode is read from the opened file.
    pub fn load(path: &Path, required: bool) -> Result<Config> {
        use std::io::Read;
        use std::os::unix::fs::PermissionsExt;
        let reading = |e| Error::io(format!("reading config file {}", path.display()), e);
        let mut file = match std::fs::File::open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                return Ok(Config::default())
            }
            Err(e) => return Err(reading(e)),
        };
        let mode = file.metadata().map_err(reading)?.permissions().mode() & 0o777;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(reading)?;
        let cfg = Config::parse(&text)
            .map_err(|e| invalid(format!("config file {}: {e}", path.display())))?;
        if cfg.holds_secrets() && mode & 0o044 != 0 {
            return Err(Error::new(
                ErrorKind::PermissionDenied,
                format!(
                    "config file {} holds secrets (credentials of [targets]) but its mode {mode:04o} \
                     lets group or others read it: chmod 600 {}",
                    path.display(),
                    path.display()
                ),
            ));
        }
        Ok(cfg)
    }

    /// True when the config holds credentials: any remote target (its password, secret key
    /// or auth headers).
    pub fn holds_secrets(&self) -> bool {
        !self.targets.is_empty()
    }

    /// Makes every `[paths]` directory absolute and real, once at start: adds the daemon's own
    /// `<repository>/import` and `<repository>/export` (created with mode 0700), then
    /// canonicalizes each entry (a missing directory is an error naming it). Containment is
    /// checked against these real paths.
    pub fn resolve_paths(&mut self) -> Result<()> {
        use std::os::unix::fs::DirBuilderExt;
        let repo = self.repository.path.clone();
        for (key, own, list) in [
            (
                "paths.import_dirs",
                repo.join("import"),
                &mut self.paths.import_dirs,
            ),
            (
                "paths.export_dirs",
                repo.join("export"),
                &mut self.paths.export_dirs,
            ),
        ] {
            // A read-only repository still serves reads: its own directory is then left out.
            let own = match std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&own)
            {
                Ok(()) => Some(own),
                Err(e) => {
                    tracing::warn!(dir = %own.display(), error = %e, "cannot create the daemon's own {key} directory; only the configured ones are allowed");
                    None
                }
            };
            let mut real = Vec::new();
            for d in own.iter().chain(list.iter()) {
                let r = std::fs::canonicalize(d).map_err(|e| {
                    Error::io(
                        format!("{key}: directory {} cannot be resolved; create it or remove it from the list", d.display()),
                        e,
                    )
                })?;
                if !r.is_dir() {
                    return Err(invalid(format!(
                        "{key}: {} is not a directory",
                        d.display()
                    )));
                }
                if !real.contains(&r) {
                    real.push(r);
                }
            }
            *list = real;
        }
        Ok(())
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
            // The API can shut down and read any VM of the host: over TCP only clients with a
            // certificate of the configured CA may talk to it.
            if self.tls.is_none() {
                return Err(invalid(format!(
                    "daemon.tcp_listen {addr} is set but the config has no [tls] section: TCP is \
                     served only with mutual TLS; add [tls] with cert, key and client_ca, or remove \
                     tcp_listen and use the unix socket"
                )));
            }
        }
        if let Some(t) = &self.tls {
            for (key, p) in [
                ("tls.cert", &t.cert),
                ("tls.key", &t.key),
                ("tls.client_ca", &t.client_ca),
            ] {
                if !p.is_absolute() {
                    return Err(invalid(format!(
                        "{key} must be an absolute path to a PEM file, got {p:?}"
                    )));
                }
            }
            if t.handshake_timeout_secs > 300 {
                return Err(invalid(format!(
                    "tls.handshake_timeout_secs must be 1 to 300, got {}",
                    t.handshake_timeout_secs
                )));
            }
        }
        self.validate_policy()?;
        for (key, list) in [
            ("paths.import_dirs", &self.paths.import_dirs),
            ("paths.export_dirs", &self.paths.export_dirs),
        ] {
            if let Some(d) = list.iter().find(|d| !d.is_absolute()) {
                return Err(invalid(format!(
                    "{key} must hold absolute paths, got {d:?}"
                )));
            }
        }
        if !(1..=10_000).contains(&d.max_operations_per_identity) {
            return Err(invalid(format!(
                "daemon.max_operations_per_identity must be 1 to 10000, got {}",
                d.max_operations_per_identity
            )));
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

    /// Checks each `[[policy]]` entry: a known role and at least one identity to match.
    pub fn validate_policy(&self) -> Result<()> {
        for (i, e) in self.policy.iter().enumerate() {
            let n = i + 1;
            if e.role().is_none() {
                return Err(invalid(format!(
                    "policy entry {n}: role {:?} is unknown; use viewer, operator or admin",
                    e.role
                )));
            }
            if e.unix_uids.is_empty()
                && e.unix_gids.is_empty()
                && e.tls_subjects.is_empty()
                && e.tls_sans.is_empty()
            {
                return Err(invalid(format!(
                    "policy entry {n} (role {}) matches nobody: give unix_uids, unix_gids, \
                     tls_subjects or tls_sans",
                    e.role
                )));
            }
            if let Some(s) = e
                .tls_subjects
                .iter()
                .chain(&e.tls_sans)
                .find(|s| s.trim().is_empty() || s.trim() != s.as_str())
            {
                return Err(invalid(format!(
                    "policy entry {n} (role {}): {s:?} is empty or has surrounding spaces; \
                     write the name exactly as in the certificate",
                    e.role
                )));
            }
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
    fn tcp_needs_tls_and_tls_paths_are_absolute() {
        let e = Config::parse("[daemon]\ntcp_listen = \"0.0.0.0:7070\"").unwrap_err();
        assert!(e.to_string().contains("[tls]"), "{e}");
        let tls = "[tls]\ncert = \"/t/c.pem\"\nkey = \"/t/k.pem\"\nclient_ca = \"/t/ca.pem\"\n";
        let c = Config::parse(&format!("[daemon]\ntcp_listen = \"0.0.0.0:7070\"\n{tls}")).unwrap();
        assert_eq!(
            c.tls.unwrap().handshake_timeout(),
            std::time::Duration::from_secs(10)
        );
        let e = Config::parse("[tls]\ncert = \"c.pem\"\nkey = \"/k\"\nclient_ca = \"/ca\"")
            .unwrap_err();
        assert!(e.to_string().contains("tls.cert"), "{e}");
    }

    #[test]
    fn policy_entries_are_checked_and_named() {
        let c = Config::parse(
            "[[policy]]\nrole = \"operator\"\nunix_uids = [1000]\ntls_sans = [\"cp1.example.org\"]\n",
        )
        .unwrap();
        assert_eq!(c.policy[0].role(), Some(Role::Operator));
        for (text, want) in [
            (
                "[[policy]]\nrole = \"viewer\"\nunix_uids = [1]\n[[policy]]\nrole = \"root\"\nunix_uids = [0]\n",
                "policy entry 2: role \"root\" is unknown",
            ),
            (
                "[[policy]]\nrole = \"admin\"\n",
                "policy entry 1 (role admin) matches nobody",
            ),
            (
                "[[policy]]\nrole = \"admin\"\ntls_subjects = [\" cp1\"]\n",
                "policy entry 1 (role admin)",
            ),
            ("[[policy]]\nrole = \"admin\"\nunix_user = [0]\n", "unix_user"),
        ] {
            let e = Config::parse(text).unwrap_err();
            assert!(e.to_string().contains(want), "{text}: {e}");
        }
        for n in [0, 10_001] {
            let e =
                Config::parse(&format!("[daemon]\nmax_operations_per_identity = {n}")).unwrap_err();
            assert!(e.to_string().contains("max_operations_per_identity"), "{e}");
        }
    }

    #[test]
    fn a_config_with_secrets_must_not_be_readable_by_others() {
        use std::os::unix::fs::PermissionsExt;
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("imaged.toml");
        let secret =
            "[targets.s3]\nkind = \"s3\"\nendpoint = \"http://127.0.0.1:1\"\nbucket = \"b\"\n\
                      access_key = \"a\"\nsecret_key = \"s\"\n";
        std::fs::write(&p, secret).unwrap();
        for (mode, ok) in [
            (0o600, true),
            (0o400, true),
            (0o640, false),
            (0o644, false),
            (0o604, false),
        ] {
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
            match Config::load(&p, true) {
                Ok(_) => assert!(ok, "{mode:o} accepted"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    assert_eq!(e.kind(), ErrorKind::PermissionDenied);
                    let m = e.to_string();
                    assert!(m.contains(&p.display().to_string()), "{m}");
                    assert!(m.contains(&format!("{mode:04o}")), "{m}");
                    assert!(m.contains("chmod 600"), "{m}");
                }
            }
        }
        // Without secrets the mode is the admin's business.
        std::fs::write(&p, "[daemon]\nlog_level = \"info\"\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        Config::load(&p, true).unwrap();
    }

    #[test]
    fn paths_are_made_real_with_the_daemons_own() {
        let d = tempfile::tempdir().unwrap();
        let real = std::fs::canonicalize(d.path()).unwrap();
        std::fs::create_dir(real.join("in")).unwrap();
        std::os::unix::fs::symlink(real.join("in"), real.join("in-link")).unwrap();
        let mut c = Config::parse(&format!(
            "[repository]\npath = {:?}\n[paths]\nimport_dirs = [{:?}]\n",
            real.join("repo"),
            real.join("in-link")
        ))
        .unwrap();
        c.resolve_paths().unwrap();
        assert_eq!(
            c.paths.import_dirs,
            [real.join("repo/import"), real.join("in")]
        );
        assert_eq!(c.paths.export_dirs, [real.join("repo/export")]);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(real.join("repo/export"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o700);
        let mut c = Config::parse("[paths]\nexport_dirs = [\"/nonexistent/x\"]").unwrap();
        c.repository.path = real.join("repo");
        let e = c.resolve_paths().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x"), "{e}");
        let e = Config::parse("[paths]\nimport_dirs = [\"rel\"]").unwrap_err();
        assert!(e.to_string().contains("paths.import_dirs"), "{e}");
    }

    #[test]
    fn missing_default_file_is_fine_missing_explicit_is_not() {
        let p = Path::new("/nonexistent/imaged.toml");
        assert!(Config::load(p, false).is_ok());
        assert!(Config::load(p, true).is_err());
    }

    /// Every combination of the trust settings (TCP listener, `[tls]`, `[[policy]]`, `[paths]`,
    /// the per-identity operation limit) is either accepted whole or refused naming the key at
    /// fault: a setting can never be accepted and then silently ignored because of another.
    #[test]
    fn trust_settings_combine_or_are_refused_by_name() {
        // (text, the key a refusal must name; None when valid)
        let tcp: &[(&str, Option<&str>)] = &[
            ("", None),
            ("[daemon]\ntcp_listen = \"127.0.0.1:7070\"\n", None),
            ("[daemon]\ntcp_listen = \"[::]:7070\"\n", None),
            (
                "[daemon]\ntcp_listen = \"localhost\"\n",
                Some("daemon.tcp_listen"),
            ),
        ];
        let tls: &[(&str, Option<&str>)] = &[
            ("", None),
            (
                "[tls]\ncert = \"/t/c.pem\"\nkey = \"/t/k.pem\"\nclient_ca = \"/t/ca.pem\"\n",
                None,
            ),
            (
                "[tls]\ncert = \"c.pem\"\nkey = \"/t/k.pem\"\nclient_ca = \"/t/ca.pem\"\n",
                Some("tls.cert"),
            ),
            (
                "[tls]\ncert = \"/t/c.pem\"\nkey = \"/t/k.pem\"\nclient_ca = \"/t/ca.pem\"\n\
                 handshake_timeout_secs = 301\n",
                Some("tls.handshake_timeout_secs"),
            ),
        ];
        let policy: &[(&str, Option<&str>)] = &[
            ("", None),
            (
                "[[policy]]\nrole = \"viewer\"\ntls_subjects = [\"cp1\"]\n",
                None,
            ),
            ("[[policy]]\nrole = \"admin\"\nunix_gids = [0]\n", None),
            (
                "[[policy]]\nrole = \"root\"\nunix_uids = [0]\n",
                Some("role"),
            ),
            ("[[policy]]\nrole = \"operator\"\n", Some("matches nobody")),
            (
                "[[policy]]\nrole = \"operator\"\ntls_sans = [\" cp1\"]\n",
                Some("surrounding spaces"),
            ),
        ];
        let paths: &[(&str, Option<&str>)] = &[
            ("", None),
            (
                "[paths]\nimport_dirs = [\"/srv/in\"]\nexport_dirs = [\"/srv/out\"]\n",
                None,
            ),
            (
                "[paths]\nexport_dirs = [\"out\"]\n",
                Some("paths.export_dirs"),
            ),
        ];
        let limit: &[(&str, Option<&str>)] = &[
            ("", None),
            ("max_operations_per_identity = 1\n", None),
            (
                "max_operations_per_identity = 0\n",
                Some("max_operations_per_identity"),
            ),
        ];
        let mut cases = 0;
        for (t, t_bad) in tcp {
            for (s, s_bad) in tls {
                for (p, p_bad) in policy {
                    for (d, d_bad) in paths {
                        for (l, l_bad) in limit {
                            cases += 1;
                            // The limit lives in [daemon]: append it to that table.
                            let daemon = if l.is_empty() {
                                t.to_string()
                            } else if t.is_empty() {
                                format!("[daemon]\n{l}")
                            } else {
                                format!("{t}{l}")
                            };
                            let text = format!("{daemon}{s}{p}{d}");
                            let tcp_without_tls = !t.is_empty() && t_bad.is_none() && s.is_empty();
                            let faults: Vec<&str> = [
                                *t_bad,
                                tcp_without_tls.then_some("[tls]"),
                                *s_bad,
                                *p_bad,
                                *d_bad,
                                *l_bad,
                            ]
                            .into_iter()
                            .flatten()
                            .collect();
                            match (Config::parse(&text), faults.is_empty()) {
                                (Ok(c), true) => {
                                    // Accepted settings are in force, not dropped.
                                    assert_eq!(c.tls.is_some(), !s.is_empty(), "{text}");
                                    assert_eq!(c.policy.is_empty(), p.is_empty(), "{text}");
                                    assert_eq!(
                                        c.paths.export_dirs.is_empty(),
                                        d.is_empty(),
                                        "{text}"
                                    );
                                    let want = if l.is_empty() { 16 } else { 1 };
                                    assert_eq!(
                                        c.daemon.max_operations_per_identity, want,
                                        "{text}"
                                    );
                                }
                                (Ok(_), false) => {
                                    panic!("accepted although {faults:?} is wrong:\n{text}")
                                }
                                (Err(e), true) => panic!("refused a valid config ({e}):\n{text}"),
                                (Err(e), false) => {
                                    let msg = e.to_string();
                                    assert!(
                                        faults.iter().any(|f| msg.contains(f)),
                                        "refusal names none of {faults:?}: {msg}\n{text}"
                                    );
                                }
                            }
                        }
                    }
                }
            }
        }
        assert_eq!(cases, 4 * 4 * 6 * 3 * 3);
    }
}
