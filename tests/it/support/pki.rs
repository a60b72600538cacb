//! Certificates for the mutual-TLS tests, made with rcgen: a server CA and a client CA, server
//! and client certificates (valid or expired), and a daemon serving TCP on 127.0.0.1 with them.

use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, SanType,
};

use super::daemon::{Daemon, DaemonOptions};

/// A CA: its certificate and key.
pub struct Ca {
    pub cert: rcgen::Certificate,
    pub key: KeyPair,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name.push(DnType::CommonName, name);
        Ca {
            cert: p.self_signed(&key).unwrap(),
            key,
        }
    }

    /// A leaf certificate for `cn` (server: for 127.0.0.1 and localhost), PEM cert and key.
    pub fn issue(&self, cn: &str, server: bool, expired: bool) -> (String, String) {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
        p.distinguished_name.push(DnType::CommonName, cn);
        if server {
            p.subject_alt_names = vec![
                SanType::DnsName("localhost".try_into().unwrap()),
                SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            ];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        } else {
            p.subject_alt_names = vec![SanType::URI(
                format!("spiffe://imaged.test/{cn}").try_into().unwrap(),
            )];
            p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        }
        if expired {
            p.not_before = rcgen::date_time_ymd(2020, 1, 1);
            p.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let cert = p.signed_by(&key, &self.cert, &self.key).unwrap();
        (cert.pem(), key.serialize_pem())
    }
}

pub fn write(path: &Path, text: &str, mode: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// The files of one TLS setup in `dir`: the server's, the client CA, and named clients.
pub struct Pki {
    pub dir: PathBuf,
    pub server_ca: Ca,
    pub client_ca: Ca,
}

impl Pki {
    pub fn new(dir: &Path) -> Pki {
        std::fs::create_dir_all(dir).unwrap();
        let pki = Pki {
            dir: dir.to_path_buf(),
            server_ca: Ca::new("imaged test server CA"),
            client_ca: Ca::new("imaged test client CA"),
        };
        pki.write_server(&pki.server_ca, "server-ca.pem");
        write(&dir.join("client-ca.pem"), &pki.client_ca.cert.pem(), 0o644);
        pki
    }

    /// Issues a server certificate from `ca` into server.pem/server.key; writes `ca` to `ca_file`.
    pub fn write_server(&self, ca: &Ca, ca_file: &str) {
        let (cert, key) = ca.issue("imaged", true, false);
        write(&self.dir.join("server.pem"), &cert, 0o644);
        write(&self.dir.join("server.key"), &key, 0o600);
        write(&self.dir.join(ca_file), &ca.cert.pem(), 0o644);
    }

    /// A client certificate from `ca` (the client CA unless given): (cert, key) paths.
    pub fn client(&self, cn: &str, ca: Option<&Ca>, expired: bool) -> (PathBuf, PathBuf) {
        let (cert, key) = ca.unwrap_or(&self.client_ca).issue(cn, false, expired);
        let c = self.dir.join(format!("{cn}.pem"));
        let k = self.dir.join(format!("{cn}.key"));
        write(&c, &cert, 0o644);
        write(&k, &key, 0o600);
        (c, k)
    }

    pub fn tls_toml(&self) -> String {
        format!(
            "[tls]\ncert = {:?}\nkey = {:?}\nclient_ca = {:?}\nhandshake_timeout_secs = 5\n",
            self.dir.join("server.pem"),
            self.dir.join("server.key"),
            self.dir.join("client-ca.pem")
        )
    }
}

/// Starts a daemon on TCP 127.0.0.1 (a free port) with `pki`'s TLS files and `policy`.
pub fn tls_daemon(pki: &Pki, policy: &str) -> (Daemon, String) {
    let d = Daemon::start_with(DaemonOptions {
        daemon_toml: "tcp_listen = \"127.0.0.1:0\"\n".into(),
        extra_toml: format!("{}\n{policy}", pki.tls_toml()),
        ..Default::default()
    });
    // The ready line names the bound address.
    let t0 = Instant::now();
    loop {
        let log = d.log_text();
        if let Some(at) = log.find("tcp=127.0.0.1:") {
            let rest = &log[at + "tcp=".len()..];
            let addr: String = rest.chars().take_while(|c| !c.is_whitespace()).collect();
            return (d, format!("https://{addr}"));
        }
        assert!(
            t0.elapsed() < Duration::from_secs(30),
            "no ready line: {log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}
