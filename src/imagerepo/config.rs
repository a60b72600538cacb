//! The repository server's configuration: `/etc/imagerepo/imagerepo.toml`.
//!
//! Every key has an embedded default, so `imagerepo` runs with no file at all: data under
//! `/var/lib/imagerepo` (catalog `catalog.db`, chunks under `chunks/`), the unix socket
//! `/run/imagerepo/imagerepo.sock`, uid 0 on it is admin. Unknown keys and bad values are
//! refused at start with the key's name, so a typo never falls back to a default silently.
//!
//! ```toml
//! [server]
//! data_dir = "/var/lib/imagerepo"
//! socket = "/run/imagerepo/imagerepo.sock"
//! socket_mode = "0660"
//! tcp_listen = "0.0.0.0:7443"          # needs [tls]
//! log_level = "info"
//!
//! [tls]
//! cert = "/etc/imagerepo/server.pem"
//! key = "/etc/imagerepo/server.key"
//! client_ca = "/etc/imagerepo/client-ca.pem"
//!
//! [catalog]
//! default_image_quota = 10             # private images per project
//! recycle_bin_days = 7
//! backend = "sqlite"                   # or "postgres": several servers share one catalog
//! # url = "postgresql://imagerepo@db.example.org:5432/imagerepo"   # backend = "postgres"
//! # password_file = "/etc/imagerepo/catalog.password"   # owner-only; or the password in
//! #                                     # the url, and then this file must be owner-only
//!
//! [gc]
//! gc_grace_secs = 3600                 # an unreferenced chunk younger than this is kept
//! interval_secs = 3600                 # 0: only when an admin asks
//! upload_idle_secs = 86400             # open uploads idle longer are aborted
//!
//! [download]
//! download_listen = "127.0.0.1:7480"   # empty: no download links
//! public_base_url = "https://images.example.org"
//! key_file = "/var/lib/imagerepo/download.key"
//!
//! [[policy]]
//! role = "project"                     # admin, service or project
//! project = "alpha"
//! tls_subjects = ["alpha-portal"]
//! ```

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::chunks_s3::S3ChunksConfig;
use crate::error::{invalid, Error, ErrorKind, Result};

/// Where the server looks when `--config` is not given.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/imagerepo/imagerepo.toml";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RepoConfig {
    pub server: ServerConfig,
    /// `[tls]`: required by `server.tcp_listen`.
    pub tls: Option<TlsFiles>,
    pub catalog: CatalogConfig,
    pub gc: GcConfig,
    pub download: DownloadConfig,
    /// `[chunks]`: where chunk bytes live (default: `{data_dir}/chunks`).
    pub chunks: ChunksConfig,
    /// `[[policy]]`: identities and their roles. Empty: uid 0 on the socket is admin.
    pub policy: Vec<PolicyEntry>,
}

/// `[chunks]`: `backend = "local"` (the default: files under `{data_dir}/chunks`) or
/// `backend = "s3"` with the keys of [`S3ChunksConfig`] (one object a chunk in a bucket of
/// S3-compatible storage: Ceph RGW, MinIO, AWS).
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(tag = "backend", rename_all = "snake_case")]
pub enum ChunksConfig {
    #[default]
    Local,
    S3(S3ChunksConfig),
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Catalog (`catalog.db`) and chunks (`chunks/`).
    pub data_dir: PathBuf,
    /// The unix socket of the gRPC API.
    pub socket: PathBuf,
    /// Octal permission bits of the socket.
    pub socket_mode: String,
    /// `HOST:PORT` of the TCP listener (mutual TLS); empty: none.
    pub tcp_listen: String,
    /// error, warn, info, debug or trace.
    pub log_level: String,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            data_dir: PathBuf::from("/var/lib/imagerepo"),
            socket: PathBuf::from("/run/imagerepo/imagerepo.sock"),
            socket_mode: "0660".into(),
            tcp_listen: String::new(),
            log_level: "info".into(),
        }
    }
}

/// `[tls]`: the TCP listener's certificate and key, and the CA client certificates chain to.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: PathBuf,
    /// Seconds a client has to finish its handshake (default 10).
    pub handshake_timeout_secs: u64,
}

impl TlsFiles {
    /// The handshake timeout (10 s when unset).
    pub fn handshake_timeout(&self) -> std::time::Duration {
        std::time::Duration::from_secs(match self.handshake_timeout_secs {
            0 => 10,
            n => n,
        })
    }
}

/// `[catalog]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CatalogConfig {
    /// Private images (any state but DELETED) a project may hold unless an admin set another
    /// limit for it.
    pub default_image_quota: u32,
    /// Days a deleted image stays in the recycle bin before it is purged.
    pub recycle_bin_days: u32,
    /// `sqlite` (a file in `server.data_dir`) or `postgres` (`url`).
    pub backend: String,
    /// `postgresql://user[:password]@host[:port]/database` (backend `postgres`).
    pub url: String,
    /// A file holding the database password (owner-only), instead of a password in `url`.
    pub password_file: PathBuf,
}

impl Default for CatalogConfig {
    fn default() -> Self {
        CatalogConfig {
            default_image_quota: 10,
            recycle_bin_days: 7,
            backend: "sqlite".into(),
            url: String::new(),
            password_file: PathBuf::new(),
        }
    }
}

impl CatalogConfig {
    /// True for `backend = "postgres"`.
    pub fn is_postgres(&self) -> bool {
        self.backend == "postgres"
    }

    /// The backend's settings, checked (no file read, no connection).
    fn validate(&self) -> Result<()> {
        match self.backend.as_str() {
            "sqlite" => {
                for (k, set) in [
                    ("catalog.url", !self.url.is_empty()),
                    (
                        "catalog.password_file",
                        !self.password_file.as_os_str().is_empty(),
                    ),
                ] {
                    if set {
                        return Err(invalid(format!(
                            "{k} is set but catalog.backend is \"sqlite\": set backend = \
                             \"postgres\" or remove {k}"
                        ))
                        .with_field(k));
                    }
                }
                Ok(())
            }
            "postgres" => {
                let cfg = self.parsed_url()?;
                if cfg.get_password().is_some() && !self.password_file.as_os_str().is_empty() {
                    return Err(invalid(
                        "catalog.url holds a password and catalog.password_file is set too: \
                         keep one",
                    )
                    .with_field("catalog.password_file"));
                }
                if !self.password_file.as_os_str().is_empty() && !self.password_file.is_absolute() {
                    return Err(invalid(format!(
                        "catalog.password_file must be an absolute path, got {:?}",
                        self.password_file
                    ))
                    .with_field("catalog.password_file"));
                }
                Ok(())
            }
            other => Err(invalid(format!(
                "catalog.backend must be \"sqlite\" or \"postgres\", got {other:?}"
            ))
            .with_field("catalog.backend")),
        }
    }

    /// `url`, parsed.
    fn parsed_url(&self) -> Result<postgres::Config> {
        if self.url.is_empty() {
            return Err(invalid(
                "catalog.url is missing: backend = \"postgres\" needs \
                 url = \"postgresql://user@host:port/database\"",
            )
            .with_field("catalog.url"));
        }
        if !self.url.starts_with("postgresql://") && !self.url.starts_with("postgres://") {
            return Err(invalid(format!(
                "catalog.url must start with postgresql://, got {:?}",
                redact(&self.url)
            ))
            .with_field("catalog.url"));
        }
        let cfg: postgres::Config = self.url.parse().map_err(|e| {
            invalid(format!("catalog.url {:?}: {e}", redact(&self.url))).with_field("catalog.url")
        })?;
        if cfg.get_hosts().is_empty() {
            return Err(
                invalid(format!("catalog.url {:?} names no host", redact(&self.url)))
                    .with_field("catalog.url"),
            );
        }
        if cfg.get_dbname().is_none() || cfg.get_user().is_none() {
            return Err(invalid(format!(
                "catalog.url {:?} must name a user and a database: \
                 postgresql://user@host:port/database",
                redact(&self.url)
            ))
            .with_field("catalog.url"));
        }
        Ok(cfg)
    }

    /// True when `url` carries the password (the config file must then be owner-only).
    pub fn url_has_password(&self) -> bool {
        self.is_postgres()
            && self
                .parsed_url()
                .map(|c| c.get_password().is_some())
                .unwrap_or(false)
    }

    /// The PostgreSQL connection settings: `url`, with the password read from
    /// `password_file` (which must be owner-only).
    pub fn postgres_config(&self) -> Result<postgres::Config> {
        let mut cfg = self.parsed_url()?;
        if !self.password_file.as_os_str().is_empty() {
            let p = &self.password_file;
            let what = format!("reading catalog.password_file {}", p.display());
            owner_only(
                p,
                "catalog.password_file",
                "the catalog database's password",
            )?;
            let text = std::fs::read_to_string(p).map_err(|e| Error::io(&what, e))?;
            let pw = text.trim_end_matches(['\n', '\r']);
            if pw.is_empty() {
                return Err(
                    invalid(format!("catalog.password_file {} is empty", p.display()))
                        .with_field("catalog.password_file"),
                );
            }
            cfg.password(pw);
        }
        cfg.application_name("imagerepo");
        if cfg.get_connect_timeout().is_none() {
            cfg.connect_timeout(std::time::Duration::from_secs(10));
        }
        Ok(cfg)
    }
}

/// A url with its password (if any) hidden, for messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => {
            let userinfo = &url[s + 3..at];
            match userinfo.find(':') {
                Some(c) => format!("{}{}:***{}", &url[..s + 3], &userinfo[..c], &url[at..]),
                None => url.to_string(),
            }
        }
        _ => url.to_string(),
    }
}

/// PERMISSION_DENIED unless only the owner may read `path`, which holds `secret` (`key`
/// names the setting or the config file).
fn owner_only(path: &Path, key: &str, secret: &str) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path)
        .map_err(|e| Error::io(format!("reading {key} {}", path.display()), e))?
        .permissions()
        .mode()
        & 0o777;
    if mode & 0o044 != 0 {
        return Err(Error::new(
            ErrorKind::PermissionDenied,
            format!(
                "{key} {} holds {secret} but its mode {mode:04o} lets group or others read it: \
                 chmod 600 {}",
                path.display(),
                path.display()
            ),
        )
        .with_reason("SECRET_READABLE")
        .with_field(key));
    }
    Ok(())
}

/// `[gc]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct GcConfig {
    /// An unreferenced chunk stored less than this long ago is kept (an upload may be about
    /// to name it).
    pub gc_grace_secs: u64,
    /// Seconds between collections (and bin retention, idle upload checks); 0: never by
    /// itself.
    pub interval_secs: u64,
    /// An open upload untouched this long is aborted (its record FAILED).
    pub upload_idle_secs: u64,
}

impl Default for GcConfig {
    fn default() -> Self {
        GcConfig {
            gc_grace_secs: 3600,
            interval_secs: 3600,
            upload_idle_secs: 86400,
        }
    }
}

/// `[download]`: HTTP download links.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct DownloadConfig {
    /// `HOST:PORT` of the HTTP listener of download links; empty: no links.
    pub download_listen: String,
    /// The URL clients reach that listener at (links are `{base}/v1/download/{token}`);
    /// default `http://{download_listen}`.
    pub public_base_url: String,
    /// The HMAC key of the links (made at first start); default `{data_dir}/download.key`.
    pub key_file: PathBuf,
}

/// A role of the repository's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RepoRole {
    /// Every project's images, quotas and the collector.
    Admin,
    /// Control planes and agents: act for the project named per call.
    Service,
    /// One project.
    Project,
}

/// One `[[policy]]` entry: a role (with its project for `project`), and who gets it.
#[derive(Debug, Clone, Deserialize, Default, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PolicyEntry {
    /// admin, service or project.
    pub role: String,
    /// The project of a `project` entry.
    pub project: String,
    /// Unix socket peers by uid.
    pub unix_uids: Vec<u32>,
    /// TLS clients by their certificate's subject CN.
    pub tls_subjects: Vec<String>,
    /// TLS clients by a DNS or URI SAN.
    pub tls_sans: Vec<String>,
}

impl PolicyEntry {
    /// The role, checked by [`RepoConfig::validate`].
    pub fn role(&self) -> Option<RepoRole> {
        match self.role.as_str() {
            "admin" => Some(RepoRole::Admin),
            "service" => Some(RepoRole::Service),
            "project" => Some(RepoRole::Project),
            _ => None,
        }
    }
}

/// Checks a project id: 1 to 63 lowercase letters, digits and '-', starting with a letter
/// or digit (it appears in resource names).
pub fn validate_project(p: &str) -> Result<()> {
    let ok = !p.is_empty()
        && p.len() <= 63
        && p.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && !p.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(invalid(format!(
            "project {p:?} is not a project id: 1 to 63 lowercase letters, digits, '-' or '_'"
        )))
    }
}

impl RepoConfig {
    /// Reads `path`; a missing file is fine only when `required` is false (the default path).
    pub fn load(path: &Path, required: bool) -> Result<RepoConfig> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(e) => {
                return Err(Error::io(
                    format!("reading config file {}", path.display()),
                    e,
                ))
            }
        };
        let cfg = RepoConfig::parse(&text)
            .map_err(|e| invalid(format!("config file {}: {e}", path.display())))?;
        if matches!(cfg.chunks, ChunksConfig::S3(_)) {
            owner_only(
                path,
                "config file",
                "the object store's secret key ([chunks])",
            )?;
        }
        if cfg.catalog.url_has_password() {
            owner_only(
                path,
                "config file",
                "the catalog database's password (catalog.url)",
            )?;
        }
        Ok(cfg)
    }

    /// Parses and checks a config text.
    pub fn parse(text: &str) -> Result<RepoConfig> {
        let cfg: RepoConfig = toml::from_str(text).map_err(|e| invalid(e.to_string()))?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Every rule the types cannot say.
    pub fn validate(&self) -> Result<()> {
        if let ChunksConfig::S3(s3) = &self.chunks {
            s3.bucket()?;
        }
        if !self.server.data_dir.is_absolute() {
            return Err(invalid(format!(
                "server.data_dir must be an absolute path, got {:?}",
                self.server.data_dir
            )));
        }
        if !self.server.socket.is_absolute() {
            return Err(invalid(format!(
                "server.socket must be an absolute path, got {:?}",
                self.server.socket
            )));
        }
        self.socket_mode()?;
        self.log_level()?;
        if !self.server.tcp_listen.is_empty() && self.tls.is_none() {
            return Err(invalid(format!(
                "server.tcp_listen = {:?} needs a [tls] section (cert, key, client_ca): TCP is \
                 served only with mutual TLS",
                self.server.tcp_listen
            )));
        }
        if let Some(t) = &self.tls {
            for (k, p) in [
                ("tls.cert", &t.cert),
                ("tls.key", &t.key),
                ("tls.client_ca", &t.client_ca),
            ] {
                if p.as_os_str().is_empty() {
                    return Err(invalid(format!(
                        "{k} is missing: [tls] needs cert, key and client_ca"
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
        self.catalog.validate()?;
        if self.catalog.recycle_bin_days == 0 {
            return Err(invalid(
                "catalog.recycle_bin_days must be at least 1 (purge an image to remove it at once)",
            ));
        }
        if !self.download.public_base_url.is_empty()
            && !self.download.public_base_url.starts_with("http://")
            && !self.download.public_base_url.starts_with("https://")
        {
            return Err(invalid(format!(
                "download.public_base_url must start with http:// or https://, got {:?}",
                self.download.public_base_url
            )));
        }
        for (i, e) in self.policy.iter().enumerate() {
            let n = i + 1;
            let Some(role) = e.role() else {
                return Err(invalid(format!(
                    "policy entry {n}: role {:?} is unknown; use admin, service or project",
                    e.role
                )));
            };
            match role {
                RepoRole::Project => validate_project(&e.project).map_err(|err| {
                    invalid(format!(
                        "policy entry {n} (role project) needs project = \"NAME\": {err}"
                    ))
                })?,
                _ if !e.project.is_empty() => {
                    return Err(invalid(format!(
                        "policy entry {n}: project is only for role \"project\" (role {} acts \
                         for {})",
                        e.role,
                        if role == RepoRole::Admin {
                            "every project"
                        } else {
                            "the project named by each call"
                        }
                    )))
                }
                _ => {}
            }
            if e.unix_uids.is_empty() && e.tls_subjects.is_empty() && e.tls_sans.is_empty() {
                return Err(invalid(format!(
                    "policy entry {n} (role {}) matches nobody: give unix_uids, tls_subjects or \
                     tls_sans",
                    e.role
                )));
            }
        }
        Ok(())
    }

    /// `server.socket_mode` as permission bits.
    pub fn socket_mode(&self) -> Result<u32> {
        let s = self.server.socket_mode.trim_start_matches("0o");
        match u32::from_str_radix(s, 8) {
            Ok(m) if m <= 0o777 => Ok(m),
            _ => Err(invalid(format!(
                "server.socket_mode must be octal permission bits like \"0660\", got {:?}",
                self.server.socket_mode
            ))),
        }
    }

    /// `server.log_level` as a tracing level.
    pub fn log_level(&self) -> Result<tracing::Level> {
        self.server.log_level.parse().map_err(|_| {
            invalid(format!(
                "server.log_level must be one of error, warn, info, debug, trace; got {:?}",
                self.server.log_level
            ))
        })
    }

    /// The catalog database file.
    pub fn catalog_path(&self) -> PathBuf {
        self.server.data_dir.join("catalog.db")
    }

    /// The chunk directory.
    pub fn chunks_dir(&self) -> PathBuf {
        self.server.data_dir.join("chunks")
    }

    /// The HMAC key file of download links.
    pub fn download_key_path(&self) -> PathBuf {
        if self.download.key_file.as_os_str().is_empty() {
            self.server.data_dir.join("download.key")
        } else {
            self.download.key_file.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_config_gives_the_embedded_defaults() {
        let c = RepoConfig::parse("").unwrap();
        assert_eq!(c.catalog_path(), Path::new("/var/lib/imagerepo/catalog.db"));
        assert_eq!(c.chunks_dir(), Path::new("/var/lib/imagerepo/chunks"));
        assert_eq!(c.server.socket, Path::new("/run/imagerepo/imagerepo.sock"));
        assert_eq!(c.catalog.default_image_quota, 10);
        assert_eq!(c.catalog.recycle_bin_days, 7);
        assert!(c.policy.is_empty() && c.tls.is_none());
        assert_eq!(
            c.download_key_path(),
            Path::new("/var/lib/imagerepo/download.key")
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused_by_name() {
        let e = RepoConfig::parse("[server]\nsokcet = \"/x\"\n").unwrap_err();
        assert!(e.to_string().contains("sokcet"), "{e}");
        let e = RepoConfig::parse("[server]\ntcp_listen = \"0.0.0.0:1\"\n").unwrap_err();
        assert!(e.to_string().contains("[tls]"), "{e}");
        let e = RepoConfig::parse("[[policy]]\nrole = \"project\"\nunix_uids = [5]\n").unwrap_err();
        assert!(e.to_string().contains("project = "), "{e}");
        let e = RepoConfig::parse("[[policy]]\nrole = \"boss\"\nunix_uids = [5]\n").unwrap_err();
        assert!(e.to_string().contains("boss"), "{e}");
        let e = RepoConfig::parse("[[policy]]\nrole = \"admin\"\n").unwrap_err();
        assert!(e.to_string().contains("matches nobody"), "{e}");
        let e = RepoConfig::parse("[server]\nsocket_mode = \"999\"\n").unwrap_err();
        assert!(e.to_string().contains("socket_mode"), "{e}");
    }

    #[test]
    fn a_full_config_parses() {
        let c = RepoConfig::parse(
            r#"
            [server]
            data_dir = "/srv/repo"
            tcp_listen = "127.0.0.1:0"
            [tls]
            cert = "/a"
            key = "/b"
            client_ca = "/c"
            [catalog]
            default_image_quota = 3
            [gc]
            gc_grace_secs = 0
            [download]
            download_listen = "127.0.0.1:0"
            public_base_url = "https://x"
            [[policy]]
            role = "project"
            project = "alpha"
            tls_subjects = ["alpha"]
            [[policy]]
            role = "service"
            tls_sans = ["spiffe://x/cp"]
            "#,
        )
        .unwrap();
        assert_eq!(c.catalog.default_image_quota, 3);
        assert_eq!(c.policy[0].role(), Some(RepoRole::Project));
        assert_eq!(c.policy[1].role(), Some(RepoRole::Service));
        assert_eq!(c.gc.gc_grace_secs, 0);
    }

    #[test]
    fn chunks_backend_is_local_by_default_or_s3_with_its_keys_checked() {
        assert!(matches!(
            RepoConfig::parse("").unwrap().chunks,
            ChunksConfig::Local
        ));
        let s3 = "[chunks]\nbackend = \"s3\"\nendpoint = \"http://127.0.0.1:9000\"\n\
                  bucket = \"images\"\naccess_key = \"a\"\nsecret_key = \"s\"\n";
        match RepoConfig::parse(s3).unwrap().chunks {
            ChunksConfig::S3(c) => assert_eq!(
                (c.prefix.as_str(), c.url_style.as_str()),
                ("chunks/", "path")
            ),
            other => panic!("{other:?}"),
        }
        for (text, key) in [
            (
                s3.replace("http://127.0.0.1:9000", "ftp://x"),
                "chunks.endpoint",
            ),
            (format!("{s3}url_style = \"odd\"\n"), "chunks.url_style"),
            (format!("{s3}buckit = \"x\"\n"), "buckit"),
            ("[chunks]\nbackend = \"tape\"\n".to_string(), "tape"),
        ] {
            let e = RepoConfig::parse(&text).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
        }
        // The secret key in a file others may read is refused.
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("imagerepo.toml");
        std::fs::write(&p, s3).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = RepoConfig::load(&p, true).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        RepoConfig::load(&p, true).unwrap();
    }

    #[test]
    fn catalog_backend_is_sqlite_by_default_or_postgres_with_its_keys_checked() {
        let c = RepoConfig::parse("").unwrap();
        assert!(!c.catalog.is_postgres());
        let pg =
            "[catalog]\nbackend = \"postgres\"\nurl = \"postgresql://repo@127.0.0.1:5432/cat\"\n";
        let c = RepoConfig::parse(pg).unwrap();
        assert!(c.catalog.is_postgres());
        assert!(!c.catalog.url_has_password());
        let cfg = c.catalog.postgres_config().unwrap();
        assert_eq!(cfg.get_dbname(), Some("cat"));
        for (text, key) in [
            (
                "[catalog]\nbackend = \"mysql\"\n".to_string(),
                "catalog.backend",
            ),
            (
                "[catalog]\nbackend = \"postgres\"\n".to_string(),
                "catalog.url",
            ),
            (
                "[catalog]\nbackend = \"postgres\"\nurl = \"mysql://a@b/c\"\n".to_string(),
                "catalog.url",
            ),
            (
                "[catalog]\nbackend = \"postgres\"\nurl = \"postgresql://127.0.0.1/c\"\n"
                    .to_string(),
                "catalog.url",
            ),
            (
                "[catalog]\nurl = \"postgresql://a@b/c\"\n".to_string(),
                "catalog.url",
            ),
            (
                format!("{pg}password_file = \"relative\"\n"),
                "catalog.password_file",
            ),
            (
                pg.replace("repo@", "repo:pw@") + "password_file = \"/x\"\n",
                "catalog.password_file",
            ),
        ] {
            let e = RepoConfig::parse(&text).unwrap_err();
            assert!(e.to_string().contains(key), "{key}: {e}");
            assert!(!e.to_string().contains(":pw@"), "password shown: {e}");
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        // The password in the url: the config file must be owner-only.
        let p = dir.path().join("imagerepo.toml");
        std::fs::write(&p, pg.replace("repo@", "repo:pw@")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = RepoConfig::load(&p, true).unwrap_err();
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)).unwrap();
        assert!(RepoConfig::load(&p, true)
            .unwrap()
            .catalog
            .url_has_password());
        // The password in a file: that file must be owner-only and not empty.
        let pw = dir.path().join("pw");
        std::fs::write(&pw, "secret\n").unwrap();
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o640)).unwrap();
        let c = RepoConfig::parse(&format!("{pg}password_file = {pw:?}\n")).unwrap();
        let e = c.catalog.postgres_config().unwrap_err();
        assert!(e.to_string().contains("catalog.password_file"), "{e}");
        assert!(e.to_string().contains("chmod 600"), "{e}");
        std::fs::set_permissions(&pw, std::fs::Permissions::from_mode(0o600)).unwrap();
        let cfg = c.catalog.postgres_config().unwrap();
        assert_eq!(cfg.get_password(), Some(&b"secret"[..]));
    }
}
