//! The plain data the guest agent reports: OS facts, a program's output, network interfaces,
//! the filesystems' freeze state.

/// What `guest-get-osinfo` says about the guest's operating system.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct OsInfo {
    /// `debian`, `rhel`, `sles`, `mswindows`, ... (os-release `ID`); empty when not reported.
    pub id: String,
    /// Human name, e.g. `Debian GNU/Linux`.
    pub name: String,
    /// os-release `VERSION_ID`, e.g. `12`.
    pub version_id: String,
    /// Kernel release, e.g. `6.1.0-50-amd64`.
    pub kernel: String,
    /// A Windows guest (`id` is `mswindows`).
    pub is_windows: bool,
}

/// What a program run in the guest did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    /// Exit status; 128 + signal number when a signal killed it.
    pub exit_code: i32,
    /// The signal that killed it, if one did.
    pub signal: Option<i32>,
    /// Everything it wrote on stdout.
    pub stdout: Vec<u8>,
    /// Everything it wrote on stderr.
    pub stderr: Vec<u8>,
}

impl ExecOutput {
    /// Exited with status 0.
    pub fn success(&self) -> bool {
        self.exit_code == 0 && self.signal.is_none()
    }
    /// stdout as text (invalid UTF-8 replaced).
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    /// stderr as text (invalid UTF-8 replaced), trimmed.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).trim().to_string()
    }
}

/// A network interface as `guest-network-get-interfaces` reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetInterface {
    /// The guest's name for it (`eth0`; on Windows the adapter's friendly name, `Ethernet 2`).
    pub name: String,
    /// MAC address, when reported.
    pub hardware_address: Option<String>,
    /// Its addresses, e.g. `192.168.1.10/24`.
    pub ip_addresses: Vec<String>,
}

/// What `guest-fsfreeze-status` says of the guest's filesystems.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FreezeStatus {
    /// Nothing is frozen.
    Thawed,
    /// Frozen (any answer other than `thawed` counts as frozen: the guest is not known thawed).
    Frozen,
}
