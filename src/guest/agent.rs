//! A client of the QEMU guest agent (qemu-ga): run programs and read and write files inside a
//! running guest.
//!
//! [`GuestAgent`] is what the prep steps use; its methods block (libvirt's API is synchronous),
//! so async callers run them on tokio's blocking pool. [`QgaClient`] implements the agent's
//! protocol over any [`QgaTransport`], a channel that sends one JSON command and returns the
//! agent's reply; [`LibvirtAgent`] is that client over libvirt's
//! `virDomainQemuAgentCommand` (the `virt` crate's `qemu` feature), with its own error mapping
//! and a kept connection; [`HypervisorAgent`] is the same client over any
//! [`Hypervisor`] backend's raw `agent_command`.
//!
//! The guest is not trusted: every byte count the agent reports is checked, base64 is decoded
//! strictly, and nothing larger than [`MAX_GUEST_BYTES`] (64 MiB) is accepted from it, whether a
//! file or a program's output. `guest-exec` output that the agent truncated (its `out-truncated`
//! / `err-truncated` flags) is an error, never acted upon. Files are read with
//! `guest-file-read` in pieces of [`READ_PIECE`] bytes (the agent allows at most 48 MB a call,
//! libvirt passes at most 4 MiB of reply text). Program output travels in one
//! `guest-exec-status` reply, so through libvirt it is limited to about 3 MiB per stream.
//!
//! The file helpers beyond reading ([`GuestAgent::write_file`], [`GuestAgent::remove_file`],
//! [`GuestAgent::rename`], [`GuestAgent::list_dir`]) run POSIX `sh` and coreutils/busybox
//! programs through `guest-exec`: they are for Linux guests. Paths must be absolute and must not
//! contain newlines or NUL bytes.
//!
//! Error kinds: a domain that is not running, that has no guest agent channel or whose agent is
//! not connected is FAILED_PRECONDITION ("domain X has no responding guest agent ..."); an agent
//! that does not answer in time, or a program that does not finish in time, is UNAVAILABLE; an
//! unknown domain is NOT_FOUND; a command the agent rejects is INTERNAL, with a message naming
//! the domain and the guest file or program.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use virt::connect::Connect;
use virt::domain::Domain;
use virt::enumutil::Enum;
use virt::error::ErrorNumber;

use crate::error::{Error, ErrorKind, Result};
use crate::hypervisor::Hypervisor;

/// The most bytes accepted from the guest in one piece of data: a file, or a program's stdout
/// or stderr.
pub const MAX_GUEST_BYTES: usize = 64 << 20;
/// Bytes asked for per `guest-file-read` call: 2 MiB is 2.7 MiB of base64, below libvirt's
/// 4 MiB limit on one reply.
pub const READ_PIECE: usize = 2 << 20;
/// Bytes sent per `guest-file-write` call. Seen on qemu-ga 7.2 under libvirt 9.0: a command
/// carrying 256 KiB (350 KB of base64) is answered, one carrying 300 KiB never is; 128 KiB
/// keeps a wide margin.
pub const WRITE_PIECE: usize = 128 << 10;
/// Default time allowed for one agent command (not for a whole `exec`).
pub const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Time allowed for the helper programs behind `write_file`, `list_dir`, ...
const HELPER_TIMEOUT: Duration = Duration::from_secs(60);

/// Files up to this size are written in one `guest-exec` (the bytes on its stdin, within the
/// command size limit of [`WRITE_PIECE`]); larger ones through a temporary file and
/// `guest-file-write` in pieces.
const STDIN_WRITE_MAX: usize = WRITE_PIECE;

/// `write_file`, first part (`sh -c` with `$1` = path, `$2` = mode or empty): follow a link
/// to the file really written, make a temporary file next to it (`$p`, `$t`).
const WRITE_PREPARE: &str = r#"p=$1 m=$2
fail() { rm -f -- "$t"; echo "$1" >&2; exit 1; }
if [ -L "$p" ]; then p=$(readlink -f -- "$p") || fail "cannot resolve the link"; fi
t=$(mktemp "$(dirname -- "$p")/.imaged-tmp.XXXXXX") ||
  { echo "cannot create a temporary file" >&2; exit 1; }"#;

/// The same for a temporary file made earlier (`$3`).
const WRITE_PREPARE_EXISTING: &str = r#"p=$1 m=$2 t=$3
fail() { rm -f -- "$t"; echo "$1" >&2; exit 1; }
if [ -L "$p" ]; then p=$(readlink -f -- "$p") || fail "cannot resolve the link"; fi"#;

/// `write_file`, last part: owner and mode of the original (or the asked mode, or 0644 for a
/// new file), flushed, renamed over the original, SELinux label restored where there is one.
const WRITE_FINISH: &str = r#"if [ -e "$p" ]; then
  o=$(stat -c %u:%g -- "$p") && a=$(stat -c %a -- "$p") || fail "cannot stat the original"
  chown "$o" "$t" && chmod "$a" "$t" || fail "cannot set owner and mode"
elif [ -z "$m" ]; then
  chmod 644 "$t" || fail "cannot set the mode"
fi
if [ -n "$m" ]; then chmod "$m" "$t" || fail "cannot set mode $m"; fi
sync -- "$t" 2>/dev/null
mv -f -- "$t" "$p" || fail "cannot rename the temporary file"
if command -v restorecon >/dev/null 2>&1; then restorecon -- "$p" 2>/dev/null; fi
exit 0"#;

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

/// The guest agent of one running domain. Every method blocks.
pub trait GuestAgent: Send + Sync {
    /// The domain's name, for messages.
    fn domain(&self) -> &str;
    /// `guest-ping`: the agent answers.
    fn ping(&self) -> Result<()>;
    /// `guest-get-osinfo`.
    fn os_info(&self) -> Result<OsInfo>;
    /// `guest-network-get-interfaces`: the guest's network interfaces.
    fn network_interfaces(&self) -> Result<Vec<NetInterface>>;
    /// Runs `argv` (the program is looked up in the guest's PATH) with `stdin` as its input (at
    /// most [`WRITE_PIECE`] bytes) and waits up to `timeout` for it to exit. A non-zero exit is
    /// not an error: look at [`ExecOutput::exit_code`]. Output truncated by the agent is an
    /// error.
    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ExecOutput>;
    /// The whole content of a guest file; `None` when it does not exist.
    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>>;
    /// Replaces (or creates) a guest file safely: the bytes go to a temporary file in the same
    /// directory, which then takes the original's owner and mode (or `mode`, when given; 0644
    /// for a new file) and is renamed over it. A symbolic link is followed: its target is
    /// replaced, the link stays.
    fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()>;
    /// Removes a guest file; no error when it does not exist.
    fn remove_file(&self, path: &str) -> Result<()>;
    /// Names in a guest directory (without `.` and `..`), sorted; empty when the directory
    /// does not exist or is not a directory.
    fn list_dir(&self, path: &str) -> Result<Vec<String>>;
    /// Renames a guest file (`mv -f`).
    fn rename(&self, from: &str, to: &str) -> Result<()>;
}

/// A channel to one domain's guest agent: sends one command, returns the `return` member of
/// the reply.
pub trait QgaTransport: Send + Sync {
    /// The domain's name, for messages.
    fn domain(&self) -> &str;
    /// Sends `cmd` (`{"execute": ..., "arguments": ...}`) and waits up to `timeout` for the
    /// reply; returns its `return` value.
    fn call(&self, cmd: &Value, timeout: Duration) -> Result<Value>;
}

/// The guest agent protocol over a [`QgaTransport`].
pub struct QgaClient<T> {
    transport: T,
    timeout: Duration,
}

impl<T: QgaTransport> QgaClient<T> {
    /// A client over `transport`, allowing [`DEFAULT_COMMAND_TIMEOUT`] per command.
    pub fn with_transport(transport: T) -> Self {
        QgaClient {
            transport,
            timeout: DEFAULT_COMMAND_TIMEOUT,
        }
    }
    /// The time allowed for each agent command (not for a whole `exec`); at least 1 s.
    pub fn with_command_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout.max(Duration::from_secs(1));
        self
    }
    /// The transport.
    pub fn transport(&self) -> &T {
        &self.transport
    }

    fn call(&self, execute: &str, arguments: Option<Value>) -> Result<Value> {
        let cmd = match arguments {
            Some(a) => json!({"execute": execute, "arguments": a}),
            None => json!({ "execute": execute }),
        };
        self.transport.call(&cmd, self.timeout)
    }

    fn dom(&self) -> &str {
        self.transport.domain()
    }

    /// Runs a helper `sh -c SCRIPT sh ARGS...` that must exit 0; returns its stdout.
    fn helper(&self, what: &str, script: &str, args: &[&str]) -> Result<Vec<u8>> {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        let out = self.exec(&argv, None, HELPER_TIMEOUT)?;
        if !out.success() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what} in domain {} failed (exit status {}): {}",
                    self.dom(),
                    out.exit_code,
                    first_line(&out.stderr_text())
                ),
            ));
        }
        Ok(out.stdout)
    }

    /// [`QgaClient::helper`] with bytes on its stdin.
    fn helper_input(&self, what: &str, script: &str, args: &[&str], input: &[u8]) -> Result<()> {
        let mut argv = vec!["sh", "-c", script, "sh"];
        argv.extend_from_slice(args);
        let out = self.exec(&argv, Some(input), HELPER_TIMEOUT)?;
        if !out.success() {
            return Err(Error::new(
                ErrorKind::Internal,
                format!(
                    "{what} in domain {} failed (exit status {}): {}",
                    self.dom(),
                    out.exit_code,
                    first_line(&out.stderr_text())
                ),
            ));
        }
        Ok(())
    }

    fn file_close(&self, handle: i64) -> Result<()> {
        self.call("guest-file-close", Some(json!({ "handle": handle })))
            .map(|_| ())
    }

    fn read_handle(&self, path: &str, handle: i64) -> Result<Vec<u8>> {
        let mut data = Vec::new();
        let mut empty_reads = 0;
        loop {
            let r = self
                .call(
                    "guest-file-read",
                    Some(json!({"handle": handle, "count": READ_PIECE})),
                )
                .map_err(|e| context(e, format!("reading {path} in domain {}", self.dom())))?;
            let b64 = r.get("buf-b64").and_then(Value::as_str).unwrap_or("");
            let piece = decode_b64_capped(b64, READ_PIECE).ok_or_else(|| {
                bad_reply(self.dom(), "guest-file-read", &format!("reading {path}"))
            })?;
            if let Some(count) = r.get("count").and_then(Value::as_u64) {
                if count != piece.len() as u64 {
                    return Err(bad_reply(
                        self.dom(),
                        "guest-file-read",
                        &format!("reading {path} (count {count}, {} bytes)", piece.len()),
                    ));
                }
            }
            if data.len() + piece.len() > MAX_GUEST_BYTES {
                return Err(Error::new(
                    ErrorKind::ResourceExhausted,
                    format!(
                        "{path} in domain {} is larger than {} MiB, the most read from a guest",
                        self.dom(),
                        MAX_GUEST_BYTES >> 20
                    ),
                ));
            }
            let eof = r.get("eof").and_then(Value::as_bool).unwrap_or(true);
            if piece.is_empty() && !eof {
                empty_reads += 1;
                if empty_reads >= 3 {
                    return Err(bad_reply(
                        self.dom(),
                        "guest-file-read",
                        &format!("reading {path} (no data and no end of file)"),
                    ));
                }
            } else {
                empty_reads = 0;
            }
            data.extend_from_slice(&piece);
            if eof {
                return Ok(data);
            }
        }
    }

    fn write_handle(&self, path: &str, handle: i64, data: &[u8]) -> Result<()> {
        for piece in data.chunks(WRITE_PIECE) {
            let r = self
                .call(
                    "guest-file-write",
                    Some(json!({"handle": handle, "buf-b64": encode_b64(piece)})),
                )
                .map_err(|e| context(e, format!("writing {path} in domain {}", self.dom())))?;
            let count = r.get("count").and_then(Value::as_u64);
            if count != Some(piece.len() as u64) {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "short write to {path} in domain {} ({:?} of {} bytes)",
                        self.dom(),
                        count,
                        piece.len()
                    ),
                ));
            }
        }
        self.call("guest-file-flush", Some(json!({ "handle": handle })))
            .map_err(|e| context(e, format!("flushing {path} in domain {}", self.dom())))?;
        Ok(())
    }

    /// Whether `path` exists in the guest (as anything, a dangling link included).
    fn exists(&self, path: &str) -> Result<bool> {
        let out = self.exec(
            &["sh", "-c", r#"[ -e "$1" ] || [ -L "$1" ]"#, "sh", path],
            None,
            HELPER_TIMEOUT,
        )?;
        Ok(out.success())
    }

    fn poll_exec(&self, argv: &[&str], pid: i64, timeout: Duration) -> Result<ExecOutput> {
        let start = Instant::now();
        let mut pause = Duration::from_millis(5);
        loop {
            let r = self.call("guest-exec-status", Some(json!({ "pid": pid })))?;
            if r.get("exited").and_then(Value::as_bool) == Some(true) {
                return self.exec_result(argv, &r);
            }
            if start.elapsed() >= timeout {
                // Best effort: do not leave it running (Linux guests; errors ignored).
                let _ = self.call(
                    "guest-exec",
                    Some(json!({
                        "path": "sh",
                        "arg": ["-c", "kill -KILL \"$1\"", "sh", pid.to_string()]
                    })),
                );
                return Err(Error::new(
                    ErrorKind::Unavailable,
                    format!(
                        "`{}` did not finish within {}s in domain {} (guest pid {pid}, killed)",
                        argv.join(" "),
                        timeout.as_secs(),
                        self.dom()
                    ),
                ));
            }
            std::thread::sleep(pause.min(timeout.saturating_sub(start.elapsed())));
            pause = (pause * 3 / 2).min(Duration::from_millis(100));
        }
    }

    fn exec_result(&self, argv: &[&str], r: &Value) -> Result<ExecOutput> {
        let prog = argv.first().copied().unwrap_or("");
        for (flag, stream) in [("out-truncated", "stdout"), ("err-truncated", "stderr")] {
            if r.get(flag).and_then(Value::as_bool) == Some(true) {
                return Err(Error::new(
                    ErrorKind::Internal,
                    format!(
                        "the {stream} of `{prog}` in domain {} was truncated by the guest agent \
                         (too large); its partial output was not used",
                        self.dom()
                    ),
                ));
            }
        }
        let data = |key: &str| -> Result<Vec<u8>> {
            match r.get(key).and_then(Value::as_str) {
                None => Ok(Vec::new()),
                Some(b) => decode_b64_capped(b, MAX_GUEST_BYTES).ok_or_else(|| {
                    bad_reply(self.dom(), "guest-exec-status", &format!("`{prog}` {key}"))
                }),
            }
        };
        let signal = r
            .get("signal")
            .and_then(Value::as_i64)
            .map(|s| s.clamp(0, 127) as i32);
        let exit_code = match (r.get("exitcode").and_then(Value::as_i64), signal) {
            (Some(c), _) => c.clamp(i32::MIN as i64, i32::MAX as i64) as i32,
            (None, Some(s)) => 128 + s,
            (None, None) => -1,
        };
        Ok(ExecOutput {
            exit_code,
            signal,
            stdout: data("out-data")?,
            stderr: data("err-data")?,
        })
    }
}

impl<T: QgaTransport> GuestAgent for QgaClient<T> {
    fn domain(&self) -> &str {
        self.dom()
    }

    fn ping(&self) -> Result<()> {
        self.call("guest-ping", None).map(|_| ())
    }

    fn os_info(&self) -> Result<OsInfo> {
        let r = self.call("guest-get-osinfo", None)?;
        let s = |k: &str| {
            r.get(k)
                .and_then(Value::as_str)
                .unwrap_or("")
                .chars()
                .take(256)
                .collect::<String>()
        };
        let id = s("id");
        Ok(OsInfo {
            is_windows: id.eq_ignore_ascii_case("mswindows"),
            id,
            name: s("name"),
            version_id: s("version-id"),
            kernel: s("kernel-release"),
        })
    }

    fn network_interfaces(&self) -> Result<Vec<NetInterface>> {
        let r = self.call("guest-network-get-interfaces", None)?;
        let list = r
            .as_array()
            .ok_or_else(|| bad_reply(self.dom(), "guest-network-get-interfaces", "interfaces"))?;
        Ok(list
            .iter()
            .filter_map(|i| {
                let name = i.get("name")?.as_str()?.to_string();
                let hardware_address = i
                    .get("hardware-address")
                    .and_then(Value::as_str)
                    .map(str::to_string);
                let ip_addresses = i
                    .get("ip-addresses")
                    .and_then(Value::as_array)
                    .map(|a| {
                        a.iter()
                            .filter_map(|ip| {
                                let addr = ip.get("ip-address")?.as_str()?;
                                Some(match ip.get("prefix").and_then(Value::as_u64) {
                                    Some(p) => format!("{addr}/{p}"),
                                    None => addr.to_string(),
                                })
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                Some(NetInterface {
                    name,
                    hardware_address,
                    ip_addresses,
                })
            })
            .collect())
    }

    fn exec(&self, argv: &[&str], stdin: Option<&[u8]>, timeout: Duration) -> Result<ExecOutput> {
        let Some((path, args)) = argv.split_first() else {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                "guest-exec needs a program",
            ));
        };
        if stdin.is_some_and(|i| i.len() > WRITE_PIECE) {
            return Err(Error::new(
                ErrorKind::InvalidArgument,
                format!(
                    "input for `{path}` in domain {} is larger than {} KiB, the most one guest \
                     agent command carries",
                    self.dom(),
                    WRITE_PIECE >> 10
                ),
            ));
        }
        let mut a = json!({"path": path, "arg": args, "capture-output": true});
        if let Some(input) = stdin {
            a["input-data"] = Value::String(encode_b64(input));
        }
        let r = self
            .call("guest-exec", Some(a))
            .map_err(|e| context(e, format!("starting `{path}` in domain {}", self.dom())))?;
        let pid = r
            .get("pid")
            .and_then(Value::as_i64)
            .ok_or_else(|| bad_reply(self.dom(), "guest-exec", &format!("`{path}`")))?;
        self.poll_exec(argv, pid, timeout)
    }

    fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>> {
        check_path(self.dom(), path)?;
        let handle = match self.call("guest-file-open", Some(json!({"path": path, "mode": "r"}))) {
            Ok(h) => h.as_i64().ok_or_else(|| {
                bad_reply(self.dom(), "guest-file-open", &format!("opening {path}"))
            })?,
            Err(e) if is_agent_down(&e) => return Err(e),
            Err(e) => {
                // The agent's error text is not a contract: ask the guest whether it exists.
                if !self.exists(path)? {
                    return Ok(None);
                }
                return Err(context(
                    e,
                    format!("cannot open {path} in domain {}", self.dom()),
                ));
            }
        };
        let data = self.read_handle(path, handle);
        let closed = self.file_close(handle);
        let data = data?;
        closed.map_err(|e| context(e, format!("closing {path} in domain {}", self.dom())))?;
        Ok(Some(data))
    }

    fn write_file(&self, path: &str, data: &[u8], mode: Option<u32>) -> Result<()> {
        check_path(self.dom(), path)?;
        if let Some(m) = mode {
            if m > 0o7777 {
                return Err(Error::new(
                    ErrorKind::InvalidArgument,
                    format!("mode {m:o} for {path} is not a file mode"),
                ));
            }
        }
        let mode_s = mode.map(|m| format!("{m:o}")).unwrap_or_default();
        let what = format!("writing {path}");
        if data.len() <= STDIN_WRITE_MAX {
            // One program: the bytes arrive on its stdin.
            self.helper_input(
                &what,
                &format!("{WRITE_PREPARE}\ncat > \"$t\" || fail \"cannot write\"\n{WRITE_FINISH}"),
                &[path, &mode_s],
                data,
            )?;
            return Ok(());
        }
        // Large: a temporary file made by mktemp (mode 0600; the agent would create it 0666),
        // filled through guest-file-write, then finished by a second program.
        let out = self.helper(
            &format!("preparing to write {path}"),
            &format!("{WRITE_PREPARE}\nprintf '%s\\n' \"$t\""),
            &[path, &mode_s],
        )?;
        let tmp = String::from_utf8_lossy(&out).trim_end().to_string();
        if !tmp.starts_with('/') || tmp.contains('\n') {
            return Err(bad_reply(self.dom(), "guest-exec", &what));
        }
        let written = (|| {
            let h = self
                .call("guest-file-open", Some(json!({"path": tmp, "mode": "w"})))
                .map_err(|e| context(e, format!("opening {tmp} in domain {}", self.dom())))?
                .as_i64()
                .ok_or_else(|| bad_reply(self.dom(), "guest-file-open", &tmp))?;
            let w = self.write_handle(&tmp, h, data);
            let c = self.file_close(h);
            w?;
            c.map_err(|e| context(e, format!("closing {tmp} in domain {}", self.dom())))
        })();
        if let Err(e) = written {
            let _ = self.helper("removing a temporary file", r#"rm -f -- "$1""#, &[&tmp]);
            return Err(e);
        }
        self.helper(
            &what,
            &format!("{WRITE_PREPARE_EXISTING}\n{WRITE_FINISH}"),
            &[path, &mode_s, &tmp],
        )?;
        Ok(())
    }

    fn remove_file(&self, path: &str) -> Result<()> {
        check_path(self.dom(), path)?;
        self.helper(&format!("removing {path}"), r#"rm -f -- "$1""#, &[path])
            .map(|_| ())
    }

    fn list_dir(&self, path: &str) -> Result<Vec<String>> {
        check_path(self.dom(), path)?;
        let out = self.helper(
            &format!("listing {path}"),
            r#"[ -d "$1" ] || exit 0
cd -- "$1" || exit 1
for f in * .*; do
  case $f in .|..) continue ;; esac
  if [ -e "$f" ] || [ -L "$f" ]; then printf '%s\0' "$f"; fi
done"#,
            &[path],
        )?;
        let mut names: Vec<String> = out
            .split(|&b| b == 0)
            .filter(|n| !n.is_empty())
            .map(|n| String::from_utf8_lossy(n).into_owned())
            .collect();
        names.sort();
        names.dedup();
        Ok(names)
    }

    fn rename(&self, from: &str, to: &str) -> Result<()> {
        check_path(self.dom(), from)?;
        check_path(self.dom(), to)?;
        self.helper(
            &format!("renaming {from} to {to}"),
            r#"mv -f -- "$1" "$2""#,
            &[from, to],
        )
        .map(|_| ())
    }
}

/// The guest agent of a libvirt domain, through `virDomainQemuAgentCommand`.
pub type LibvirtAgent = QgaClient<LibvirtChannel>;

impl LibvirtAgent {
    /// The agent of domain `domain` at libvirt `uri` (e.g. `qemu:///system`). Nothing is
    /// opened until the first command.
    pub fn new(uri: &str, domain: &str) -> LibvirtAgent {
        QgaClient::with_transport(LibvirtChannel::new(uri, domain))
    }
}

/// A libvirt connection to one domain's guest agent. The connection is opened on first use
/// and kept; after any libvirt error it is dropped and the next command opens a new one. The
/// mutex also keeps to one command at a time on the agent's single channel.
pub struct LibvirtChannel {
    uri: String,
    domain: String,
    conn: Mutex<Option<(Domain, Connect)>>,
}

impl LibvirtChannel {
    /// A channel to `domain` at `uri`; nothing opened yet.
    pub fn new(uri: &str, domain: &str) -> LibvirtChannel {
        LibvirtChannel {
            uri: uri.to_string(),
            domain: domain.to_string(),
            conn: Mutex::new(None),
        }
    }

    /// The libvirt URI.
    pub fn uri(&self) -> &str {
        &self.uri
    }

    fn open(&self) -> Result<(Domain, Connect)> {
        let conn = Connect::open(Some(&self.uri)).map_err(|e| {
            Error::new(
                ErrorKind::Unavailable,
                format!(
                    "cannot connect to libvirt at {} (is libvirtd running?)",
                    self.uri
                ),
            )
            .with_source(e)
        })?;
        let dom = conn.lookup_domain_by_name(&self.domain).map_err(|e| {
            if e.code() == Enum::Known(ErrorNumber::NoDomain) {
                Error::new(
                    ErrorKind::NotFound,
                    format!("domain {} not found on this host", self.domain),
                )
                .with_source(e)
            } else {
                Error::new(
                    ErrorKind::Unavailable,
                    format!("looking up domain {} in libvirt", self.domain),
                )
                .with_source(e)
            }
        })?;
        Ok((dom, conn))
    }

    fn map_err(&self, execute: &str, e: virt::error::Error, timed_out: bool) -> Error {
        let d = &self.domain;
        let (kind, msg) = match e.code() {
            Enum::Known(ErrorNumber::ArgumentUnsupported) => (
                ErrorKind::FailedPrecondition,
                format!(
                    "domain {d} has no responding guest agent (no guest agent channel is \
                     configured; add a virtio channel org.qemu.guest_agent.0)"
                ),
            ),
            Enum::Known(ErrorNumber::OperationInvalid) => (
                ErrorKind::FailedPrecondition,
                format!("domain {d} has no responding guest agent (the domain is not running)"),
            ),
            Enum::Known(ErrorNumber::AgentCommandTimeout)
            | Enum::Known(ErrorNumber::OperationTimeout) => (
                ErrorKind::Unavailable,
                format!("the guest agent of domain {d} did not answer {execute} in time"),
            ),
            // libvirt reports both "not connected" and "no reply in time" as unresponsive;
            // the elapsed time tells them apart.
            Enum::Known(ErrorNumber::AgentUnresponsive) if timed_out => (
                ErrorKind::Unavailable,
                format!("the guest agent of domain {d} did not answer {execute} in time"),
            ),
            Enum::Known(ErrorNumber::AgentUnresponsive) => (
                ErrorKind::FailedPrecondition,
                format!(
                    "domain {d} has no responding guest agent (is qemu-guest-agent installed \
                     and running in the guest?)"
                ),
            ),
            Enum::Known(ErrorNumber::NoDomain) => (
                ErrorKind::NotFound,
                format!("domain {d} not found on this host"),
            ),
            Enum::Known(ErrorNumber::Rpc) => (
                ErrorKind::Internal,
                format!(
                    "libvirt could not carry the guest agent's reply to {execute} for domain {d} \
                     (replies over libvirt's 4 MiB message limit fail this way)"
                ),
            ),
            Enum::Known(ErrorNumber::NoConnect) | Enum::Known(ErrorNumber::SystemError) => (
                ErrorKind::Unavailable,
                format!(
                    "lost the libvirt connection at {} while talking to domain {d}'s guest agent",
                    self.uri
                ),
            ),
            _ => (
                ErrorKind::Internal,
                format!("the guest agent of domain {d} failed {execute}"),
            ),
        };
        Error::new(kind, msg).with_source(e)
    }
}

impl QgaTransport for LibvirtChannel {
    fn domain(&self) -> &str {
        &self.domain
    }

    fn call(&self, cmd: &Value, timeout: Duration) -> Result<Value> {
        let execute = cmd
            .get("execute")
            .and_then(Value::as_str)
            .unwrap_or("?")
            .to_string();
        let text = cmd.to_string();
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let mut guard = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(self.open()?);
        }
        let (dom, _) = guard.as_ref().expect("connection just opened");
        let start = Instant::now();
        let reply = match dom.qemu_agent_command(&text, secs, 0) {
            Ok(r) => r,
            Err(e) => {
                *guard = None;
                let timed_out = start.elapsed() + Duration::from_millis(200) >= timeout;
                return Err(self.map_err(&execute, e, timed_out));
            }
        };
        drop(guard);
        parse_reply(&self.domain, &execute, &reply)
    }
}

/// The guest agent reached through a [`Hypervisor`] backend's raw
/// [`Hypervisor::agent_command`], for code that holds the backend rather than a libvirt URI
/// (operations, and their tests with a fake hypervisor). Error kinds are the backend's.
pub struct HypervisorChannel {
    hv: Arc<dyn Hypervisor>,
    domain: String,
}

impl HypervisorChannel {
    /// A channel to `domain`'s agent through `hv`.
    pub fn new(hv: Arc<dyn Hypervisor>, domain: &str) -> HypervisorChannel {
        HypervisorChannel {
            hv,
            domain: domain.to_string(),
        }
    }
}

impl QgaTransport for HypervisorChannel {
    fn domain(&self) -> &str {
        &self.domain
    }

    fn call(&self, cmd: &Value, timeout: Duration) -> Result<Value> {
        let execute = cmd.get("execute").and_then(Value::as_str).unwrap_or("?");
        let secs = timeout.as_secs().clamp(1, i32::MAX as u64) as i32;
        let reply = self
            .hv
            .agent_command(&self.domain, &cmd.to_string(), secs)?;
        parse_reply(&self.domain, execute, &reply)
    }
}

/// The guest agent of a domain through a [`Hypervisor`] backend.
pub type HypervisorAgent = QgaClient<HypervisorChannel>;

impl HypervisorAgent {
    /// The agent of `domain` through `hv`.
    pub fn through(hv: Arc<dyn Hypervisor>, domain: &str) -> HypervisorAgent {
        QgaClient::with_transport(HypervisorChannel::new(hv, domain))
    }
}

/// The `return` member of an agent reply; an `error` member becomes an error.
pub fn parse_reply(domain: &str, execute: &str, reply: &str) -> Result<Value> {
    let v: Value = serde_json::from_str(reply).map_err(|e| {
        Error::new(
            ErrorKind::Internal,
            format!("the guest agent of domain {domain} sent a malformed reply to {execute}"),
        )
        .with_source(e)
    })?;
    if let Some(r) = v.get("return") {
        return Ok(r.clone());
    }
    if let Some(err) = v.get("error") {
        let class = err.get("class").and_then(Value::as_str).unwrap_or("error");
        return Err(Error::new(
            ErrorKind::Internal,
            format!(
                "the guest agent of domain {domain} refused {execute} ({})",
                class.chars().take(64).collect::<String>()
            ),
        ));
    }
    Err(Error::new(
        ErrorKind::Internal,
        format!("the guest agent of domain {domain} sent no result for {execute}"),
    ))
}

/// Errors meaning the agent cannot be talked to at all (as opposed to a command it refused).
fn is_agent_down(e: &Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::FailedPrecondition | ErrorKind::Unavailable | ErrorKind::NotFound
    )
}

/// Adds what we were doing to a failed command; errors that say the agent is unreachable
/// already name the domain and are passed on as they are.
fn context(e: Error, what: String) -> Error {
    if is_agent_down(&e) {
        e
    } else {
        Error::new(e.kind(), what).with_source(e)
    }
}

fn bad_reply(domain: &str, execute: &str, what: &str) -> Error {
    Error::new(
        ErrorKind::Internal,
        format!("the guest agent of domain {domain} sent an invalid {execute} reply ({what})"),
    )
}

fn check_path(domain: &str, path: &str) -> Result<()> {
    if !path.starts_with('/') || path.contains('\n') || path.contains('\0') {
        return Err(Error::new(
            ErrorKind::InvalidArgument,
            format!("guest path {path:?} (domain {domain}) must be absolute, without newlines"),
        ));
    }
    Ok(())
}

fn first_line(s: &str) -> String {
    let l = s.lines().next().unwrap_or("").trim();
    if l.is_empty() {
        "no message".to_string()
    } else {
        l.chars().take(300).collect()
    }
}

const B64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/// Standard base64 with padding.
pub fn encode_b64(data: &[u8]) -> String {
    let mut o = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(c.get(1).copied().unwrap_or(0)) << 8)
            | u32::from(c.get(2).copied().unwrap_or(0));
        for i in 0..4 {
            if i <= c.len() {
                o.push(B64[((n >> (18 - 6 * i)) & 63) as usize] as char);
            } else {
                o.push('=');
            }
        }
    }
    o
}

/// Strict standard base64 (padding optional, ASCII whitespace ignored); `None` when malformed
/// or when it would decode to more than `max` bytes.
pub fn decode_b64_capped(text: &str, max: usize) -> Option<Vec<u8>> {
    if text.len() / 4 * 3 > max + 3 {
        return None;
    }
    let mut out = Vec::with_capacity(text.len() / 4 * 3);
    let (mut acc, mut bits, mut pad) = (0u32, 0u32, 0usize);
    for b in text.bytes() {
        let v = match b {
            b'A'..=b'Z' => b - b'A',
            b'a'..=b'z' => b - b'a' + 26,
            b'0'..=b'9' => b - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => {
                pad += 1;
                continue;
            }
            b' ' | b'\n' | b'\r' | b'\t' => continue,
            _ => return None,
        };
        if pad > 0 {
            return None; // data after padding
        }
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
            acc &= (1 << bits) - 1;
        }
    }
    // Leftover bits must be zero and fewer than a byte; at most two '='.
    if pad > 2 || bits >= 6 || acc != 0 || out.len() > max {
        return None;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;

    /// A transport that answers from a script and records the commands.
    struct Scripted {
        replies: Mutex<VecDeque<Result<Value>>>,
        sent: Mutex<Vec<Value>>,
    }

    impl Scripted {
        fn new(replies: Vec<Result<Value>>) -> QgaClient<Scripted> {
            QgaClient::with_transport(Scripted {
                replies: Mutex::new(replies.into()),
                sent: Mutex::new(Vec::new()),
            })
        }
    }

    impl QgaTransport for Scripted {
        fn domain(&self) -> &str {
            "dom1"
        }
        fn call(&self, cmd: &Value, _timeout: Duration) -> Result<Value> {
            self.sent.lock().unwrap().push(cmd.clone());
            self.replies
                .lock()
                .unwrap()
                .pop_front()
                .unwrap_or_else(|| panic!("unexpected command {cmd}"))
        }
    }

    fn sent(c: &QgaClient<Scripted>) -> Vec<String> {
        c.transport()
            .sent
            .lock()
            .unwrap()
            .iter()
            .map(|v| v["execute"].as_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn base64_round_trips_and_rejects_garbage() {
        for data in [
            &b""[..],
            b"f",
            b"fo",
            b"foo",
            b"foob",
            b"fooba",
            &[0, 255, 128, 7],
        ] {
            assert_eq!(decode_b64_capped(&encode_b64(data), 100).unwrap(), data);
        }
        assert_eq!(encode_b64(b"foobar"), "Zm9vYmFy");
        assert_eq!(decode_b64_capped("Zm9v\nYmFy\n", 100).unwrap(), b"foobar");
        assert!(decode_b64_capped("Zm9v!", 100).is_none());
        assert!(decode_b64_capped("Zm=9v", 100).is_none());
        assert!(decode_b64_capped("Zg==", 100).is_some());
        assert!(
            decode_b64_capped("Zh==", 100).is_none(),
            "non-zero leftover bits"
        );
        assert!(decode_b64_capped(&encode_b64(&[1u8; 100]), 99).is_none());
        assert!(decode_b64_capped(&"A".repeat(1000), 10).is_none());
    }

    #[test]
    fn exec_polls_until_exit_and_decodes_output() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 42})),
            Ok(json!({"exited": false})),
            Ok(
                json!({"exited": true, "exitcode": 3, "out-data": encode_b64(b"hi\n"),
                       "err-data": encode_b64(b"oops\n")}),
            ),
        ]);
        let out = c
            .exec(&["sh", "-c", "x"], Some(b"in"), Duration::from_secs(5))
            .unwrap();
        assert_eq!(out.exit_code, 3);
        assert_eq!(out.stdout, b"hi\n");
        assert_eq!(out.stderr_text(), "oops");
        assert!(!out.success());
        let first = c.transport().sent.lock().unwrap()[0].clone();
        assert_eq!(first["arguments"]["input-data"], encode_b64(b"in"));
        assert_eq!(first["arguments"]["arg"], json!(["-c", "x"]));
    }

    #[test]
    fn exec_refuses_truncated_output() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "exitcode": 0, "out-data": "aGk=", "out-truncated": true})),
        ]);
        let e = c
            .exec(&["lsblk"], None, Duration::from_secs(5))
            .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Internal);
        assert!(
            e.to_string()
                .contains("stdout of `lsblk` in domain dom1 was truncated"),
            "{e}"
        );
    }

    #[test]
    fn exec_signal_and_bad_base64() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "signal": 9})),
            Ok(json!({"pid": 2})),
            Ok(json!({"exited": true, "exitcode": 0, "out-data": "%%%"})),
        ]);
        let out = c.exec(&["x"], None, Duration::from_secs(5)).unwrap();
        assert_eq!((out.exit_code, out.signal), (137, Some(9)));
        let e = c.exec(&["x"], None, Duration::from_secs(5)).unwrap_err();
        assert!(
            e.to_string().contains("invalid guest-exec-status reply"),
            "{e}"
        );
    }

    #[test]
    fn exec_times_out_and_kills() {
        let c = Scripted::new(vec![
            Ok(json!({"pid": 7})),
            Ok(json!({"exited": false})),
            Ok(json!({"pid": 8})),
        ]);
        let e = c.exec(&["sleep", "9"], None, Duration::ZERO).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unavailable);
        assert!(e.to_string().contains("`sleep 9` did not finish"), "{e}");
        let last = c.transport().sent.lock().unwrap().last().unwrap().clone();
        assert_eq!(
            last["arguments"]["arg"],
            json!(["-c", "kill -KILL \"$1\"", "sh", "7"])
        );
    }

    #[test]
    fn read_file_reads_pieces_until_eof_and_closes() {
        let c = Scripted::new(vec![
            Ok(json!(5)),
            Ok(json!({"count": 3, "buf-b64": encode_b64(b"abc"), "eof": false})),
            Ok(json!({"count": 2, "buf-b64": encode_b64(b"de"), "eof": false})),
            Ok(json!({"count": 0, "buf-b64": "", "eof": true})),
            Ok(json!({})),
        ]);
        assert_eq!(c.read_file("/etc/x").unwrap().unwrap(), b"abcde");
        assert_eq!(
            sent(&c),
            [
                "guest-file-open",
                "guest-file-read",
                "guest-file-read",
                "guest-file-read",
                "guest-file-close"
            ]
        );
    }

    #[test]
    fn read_file_missing_is_none_and_lying_counts_fail() {
        let c = Scripted::new(vec![
            Err(Error::new(ErrorKind::Internal, "open failed")),
            Ok(json!({"pid": 1})),
            Ok(json!({"exited": true, "exitcode": 1})),
        ]);
        assert_eq!(c.read_file("/nope").unwrap(), None);

        let c = Scripted::new(vec![
            Ok(json!(5)),
            Ok(json!({"count": 9, "buf-b64": encode_b64(b"abc"), "eof": true})),
            Ok(json!({})),
        ]);
        let e = c.read_file("/etc/x").unwrap_err();
        assert!(e.to_string().contains("reading /etc/x"), "{e}");
        assert_eq!(sent(&c).last().unwrap(), "guest-file-close");

        // Endless empty reads without EOF stop.
        let mut replies = vec![Ok(json!(5))];
        for _ in 0..3 {
            replies.push(Ok(json!({"count": 0, "buf-b64": "", "eof": false})));
        }
        replies.push(Ok(json!({})));
        let c = Scripted::new(replies);
        assert!(c.read_file("/etc/x").is_err());

        // The agent down is not "file missing".
        let c = Scripted::new(vec![Err(Error::new(
            ErrorKind::FailedPrecondition,
            "domain dom1 has no responding guest agent",
        ))]);
        assert_eq!(
            c.read_file("/x").unwrap_err().kind(),
            ErrorKind::FailedPrecondition
        );
    }

    #[test]
    fn reads_are_capped() {
        let big = encode_b64(&vec![0u8; READ_PIECE]);
        let mut replies = vec![Ok(json!(5))];
        for _ in 0..(MAX_GUEST_BYTES / READ_PIECE + 1) {
            replies.push(Ok(
                json!({"count": READ_PIECE, "buf-b64": big.clone(), "eof": false}),
            ));
        }
        replies.push(Ok(json!({})));
        let c = Scripted::new(replies);
        let e = c.read_file("/var/huge").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::ResourceExhausted);
        assert!(e
            .to_string()
            .contains("/var/huge in domain dom1 is larger than 64 MiB"));
    }

    #[test]
    fn paths_are_checked() {
        let c = Scripted::new(vec![]);
        assert_eq!(
            c.read_file("etc/x").unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
        assert_eq!(
            c.write_file("/a\nb", b"", None).unwrap_err().kind(),
            ErrorKind::InvalidArgument
        );
    }

    #[test]
    fn replies_are_parsed() {
        assert_eq!(
            parse_reply("d", "x", r#"{"return":{"a":1}}"#).unwrap()["a"],
            1
        );
        let e =
            parse_reply("d", "guest-ping", r#"{"error":{"class":"GenericError"}}"#).unwrap_err();
        assert!(e.to_string().contains("refused guest-ping (GenericError)"));
        assert!(parse_reply("d", "x", "nope").is_err());
        assert!(parse_reply("d", "x", "{}").is_err());
    }

    #[test]
    fn os_info_detects_windows() {
        let c = Scripted::new(vec![Ok(
            json!({"id": "mswindows", "name": "Microsoft Windows", "version-id": "2019",
                   "kernel-release": "17763"}),
        )]);
        let i = c.os_info().unwrap();
        assert!(i.is_windows);
        assert_eq!(i.version_id, "2019");
    }
}
